"""The example code location: a small chained pipeline on the embedded default storage.

Load it with ``dagster dev -w workspace.yaml``; run it headless with ``./scripts/run``.
"""

import dagster as dg

from definitions.assets import DAYS, features, records
from longrun_dagster import AtomicObjectStoreIOManager

defs = dg.Definitions(
    assets=[records, features],
    resources={"io_manager": AtomicObjectStoreIOManager(
        base_uri=dg.EnvVar("LONGRUN_BASE_URI").get_value() or None)},
)

__all__ = ["DAYS", "defs"]
