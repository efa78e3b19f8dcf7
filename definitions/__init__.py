"""The example code location: records -> embeddings -> quality, on the embedded default.

Load it with ``dagster dev -w workspace.yaml``; run it headless with ``./scripts/run``.
Storage comes from $LONGRUN_BASE_URI (default: under $DAGSTER_HOME).
"""

import dagster as dg

from definitions.assets import DAYS, embeddings, quality, records
from longrun_dagster import AtomicObjectStoreIOManager, GpuGuard

defs = dg.Definitions(
    assets=[records, embeddings, quality],
    resources={
        "io_manager": AtomicObjectStoreIOManager(
            base_uri=dg.EnvVar("LONGRUN_BASE_URI").get_value() or None),
        "gpu": GpuGuard(),
    },
)

__all__ = ["DAYS", "defs"]
