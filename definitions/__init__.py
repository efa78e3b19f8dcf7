"""The example code location (``dagster dev -w workspace.yaml``; headless: ``./scripts/run``).

Configuration comes from the environment, with the embedded defaults when unset:

- ``LONGRUN_BASE_URI``: ``file:///...`` or ``s3://bucket/prefix`` (default: under
  ``$DAGSTER_HOME``); for S3 also ``LONGRUN_S3_ENDPOINT`` (MinIO, a test endpoint) and the
  usual ``AWS_*`` variables, read by dagster-aws's ``S3Resource``.
- ``LONGRUN_VRAM_SOFT`` / ``LONGRUN_VRAM_HARD``: GPU guard thresholds (0.85 / 0.95).
- ``LONGRUN_STALL_TIMEOUT``: seconds without progress before a run counts as stalled (900).
"""

import os
from pathlib import Path

import dagster as dg
from dagster_aws.s3 import S3Resource

from definitions.assets import DAYS, daily_summary, embeddings, normalized, records
from longrun_dagster import (
    AtomicObjectStoreIOManager,
    GpuGuard,
    Heartbeat,
    stalled_run_sensor,
)

STALL_TIMEOUT = float(os.environ.get("LONGRUN_STALL_TIMEOUT", "900"))

annotation_job = dg.define_asset_job("annotation",
                                     selection=dg.AssetSelection.groups("annotation"))

defs = dg.Definitions.merge(dg.Definitions(
    assets=[records, normalized, embeddings, daily_summary],
    jobs=[annotation_job],
    schedules=[dg.build_schedule_from_partitioned_job(annotation_job, hour_of_day=1)],
    sensors=[stalled_run_sensor(stall_timeout_seconds=STALL_TIMEOUT, retry_budget=3)],
    resources={
        "io_manager": AtomicObjectStoreIOManager(
            base_uri=os.environ.get("LONGRUN_BASE_URI") or None,
            s3=S3Resource(endpoint_url=os.environ.get("LONGRUN_S3_ENDPOINT") or None)
            if (os.environ.get("LONGRUN_BASE_URI") or "").startswith("s3://") else None,
        ),
        "gpu": GpuGuard(soft_threshold=float(os.environ.get("LONGRUN_VRAM_SOFT", "0.85")),
                        hard_threshold=float(os.environ.get("LONGRUN_VRAM_HARD", "0.95"))),
        "heartbeat": Heartbeat(stall_timeout_seconds=STALL_TIMEOUT),
    },
    # the stages declared by configuration: definitions/stages/*/defs.yaml (the quality
    # stage); where that folder is comes from [tool.dg.project] in pyproject.toml
), dg.load_from_defs_folder(path_within_project=Path(__file__).parent))

__all__ = ["DAYS", "defs"]
