"""Materialize the test pipeline's ``scores`` stage for one partition in this process.

    python -m tests.helpers.run_stage <base_uri> <partition>

The upstream must be committed already. With DAGSTER_HOME set the run is recorded in
that instance (which enforces its concurrency pools), else in an ephemeral one.
With ANNOUNCE_BATCHES=1 the model prints ``BATCH <i>`` as each batch completes; the
stage's own log says where it resumed.
Last line ``RESULT SUCCESS`` or ``RESULT FAILED`` (exit code 0 or 1).
"""

import os
import sys

import dagster as dg

from longrun_dagster import AtomicObjectStoreIOManager
from tests.helpers.pipeline import scores, texts


def main() -> int:
    base_uri, partition = sys.argv[1], sys.argv[2]
    instance = dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else None
    result = dg.materialize(
        [texts, scores], selection=[scores], partition_key=partition, raise_on_error=False,
        instance=instance,
        resources={"io_manager": AtomicObjectStoreIOManager(base_uri=base_uri)},
        run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}},
    )
    print("RESULT", "SUCCESS" if result.success else "FAILED", flush=True)
    return 0 if result.success else 1


if __name__ == "__main__":
    sys.exit(main())
