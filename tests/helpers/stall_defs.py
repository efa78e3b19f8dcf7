"""A code location for the end-to-end stalled-run tests (loaded by a real daemon).

The stage hangs inside batch HANG_AT of the first attempt (while the HANG_MARKER file
exists), the way a stuck CUDA call hangs: only the watchdog or the sensor can end it.
With HANG_IN=setup it hangs in its model load instead.
"""

import os
import time
from typing import Any

import dagster as dg
import pandas as pd

from longrun_dagster import AtomicObjectStoreIOManager, Heartbeat, model_stage, stalled_run_sensor
from tests.helpers import pipeline

HANG_AT = 7


def _hang_once() -> None:
    marker = os.environ.get("HANG_MARKER", "")
    if marker and os.path.exists(marker):
        os.unlink(marker)
        while True:
            time.sleep(3600)


def hanging_load(stage: Any) -> Any:
    """The model load hangs (HANG_IN=setup), as a stuck download or CUDA init does."""
    if os.environ.get("HANG_IN") == "setup":
        _hang_once()
    return pipeline.load_model(stage)


def hanging_score(batch: pd.DataFrame, stage: Any) -> pd.DataFrame:
    if stage.batch_index == HANG_AT and os.environ.get("HANG_IN", "batch") == "batch" and \
            os.environ.get("HANG_PARTITION", stage.partition_key) == stage.partition_key:
        _hang_once()
    return pipeline.score_batch(batch, stage)


def quick_score(batch: pd.DataFrame, stage: Any) -> pd.DataFrame:
    return pipeline.score_batch(batch, stage)


scores = model_stage(
    upstream=pipeline.texts, schema=pipeline.Scored, partitions_def=pipeline.DAYS,
    batch_size=10, checkpoint_every_batches=2, checkpoint_every_seconds=3600,
    setup=hanging_load, name="scores", hook_resource_keys=["heartbeat"],
    time_budget_seconds=float(os.environ["TIME_BUDGET"]) if os.environ.get("TIME_BUDGET")
    else None, backfill_policy=dg.BackfillPolicy.single_run(),
    pool=os.environ.get("POOL") or None,
)(hanging_score)

# a second stage beside scores (PAIR=1: one run computes both, in parallel steps)
fast = model_stage(
    upstream=pipeline.texts, schema=pipeline.Scored, partitions_def=pipeline.DAYS,
    batch_size=50, name="fast", hook_resource_keys=["heartbeat"], setup=pipeline.load_model,
    backfill_policy=dg.BackfillPolicy.single_run(),
)(quick_score)

# EXECUTOR=multiprocess: Dagster's default executor (each step in a child process)
stage_job = dg.define_asset_job(
    "stage_job", selection=[scores, fast] if os.environ.get("PAIR") else [scores],
    executor_def=dg.multiprocess_executor if os.environ.get("EXECUTOR") == "multiprocess"
    else dg.in_process_executor)
STALL = float(os.environ.get("STALL_TIMEOUT", "4"))

defs = dg.Definitions(
    assets=[pipeline.texts, scores, fast],
    jobs=[stage_job],
    sensors=[stalled_run_sensor(stall_timeout_seconds=STALL, minimum_interval_seconds=1,
                                kill_grace_seconds=2,
                                start_grace_seconds=float(os.environ.get("START_GRACE", 30)))],
    resources={
        "io_manager": AtomicObjectStoreIOManager(),
        "heartbeat": Heartbeat(interval_seconds=0.5, stall_timeout_seconds=STALL,
                               watchdog=os.environ.get("WATCHDOG", "1") == "1"),
    },
)
