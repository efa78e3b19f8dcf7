"""A code location on Celery for tests/test_celery.py (loaded by the daemon, the run
workers and the Celery workers alike).

The tiny real-torch stage of tests/helpers/pipeline.py (pool ``gpu``) over open-ended
daily partitions (each test takes fresh days), its batches slowed by BATCH_SLEEP so that
faults land mid-stage, a heartbeat every 0.5 s and the stalled-run sensor with a short
STALL_TIMEOUT; committed to S3 (LONGRUN_BASE_URI, LONGRUN_S3_ENDPOINT), on Celery through
longrun_dagster.celery as the example is (GPU steps on the ``gpu`` queue).
"""

import hashlib
import os
import time
import types

import dagster as dg
import numpy as np
import pandas as pd
from dagster_aws.s3 import S3Resource

from longrun_dagster import AtomicObjectStoreIOManager, Heartbeat, stalled_run_sensor
from longrun_dagster.celery import on_celery
from tests.helpers import pipeline

STALL = float(os.environ.get("STALL_TIMEOUT", "6"))


def _sensor_clock() -> float:
    """The sensor's clock: real time plus the seconds in CLOCK_OFFSET_FILE (the chaos loop
    simulates a daemon that was down for hours by moving it)."""
    path = os.environ.get("CLOCK_OFFSET_FILE", "")
    try:
        with open(path) as text:
            return time.time() + float(text.read().strip() or 0)
    except (OSError, ValueError):
        return time.time()


if os.environ.get("CLOCK_OFFSET_FILE"):
    from longrun_dagster import sensors as _sensors

    _sensors.time = types.SimpleNamespace(time=_sensor_clock,  # type: ignore[assignment]
                                          sleep=time.sleep)
DAYS = dg.DailyPartitionsDefinition(start_date="2024-01-01")


@dg.asset(partitions_def=DAYS)
def texts(context: dg.AssetExecutionContext) -> pd.DataFrame:
    """pipeline.texts over these partitions: the same rows for the same day."""
    seed = int(hashlib.sha256(context.partition_key.encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng(seed)
    words = np.array("red green blue cyan magenta yellow black white".split())
    rows = [" ".join(rng.choice(words, 5)) for _ in range(pipeline.ROWS)]
    return pd.DataFrame({"id": [f"{context.partition_key}-{i}" for i in range(pipeline.ROWS)],
                         "text": rows})


scores = pipeline.make_scores(upstream=texts, partitions_def=DAYS, checkpoint_every_batches=2,
                              hook_resource_keys=["heartbeat"])
stage_job = dg.define_asset_job("stage_job", selection=[scores])


def resources(base_uri: str | None, s3_endpoint: str | None, watchdog: bool = True
              ) -> dict[str, object]:
    return {
        "io_manager": AtomicObjectStoreIOManager(
            base_uri=base_uri,
            s3=S3Resource(endpoint_url=s3_endpoint) if s3_endpoint else None),
        "heartbeat": Heartbeat(interval_seconds=0.5, stall_timeout_seconds=STALL,
                               watchdog=watchdog),
    }


defs = on_celery(dg.Definitions(
    assets=[texts, scores],
    jobs=[stage_job],
    sensors=[stalled_run_sensor(stall_timeout_seconds=STALL, minimum_interval_seconds=1,
                                kill_grace_seconds=2, start_grace_seconds=90)],
    resources=resources(os.environ.get("LONGRUN_BASE_URI") or None,
                        os.environ.get("LONGRUN_S3_ENDPOINT") or None),
))
