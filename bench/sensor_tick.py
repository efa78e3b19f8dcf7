"""Cost of reading heartbeats, and of one stalled-run sensor tick, with N running runs.

    python bench/sensor_tick.py [--runs 1,10,100]

Creates a SQLite Dagster instance with N STARTED stage runs carrying heartbeat tags, then
times (a) reading every heartbeat from run tags (one query, what the sensor does), (b)
reading each run's newest event instead (one query per run), and (c) a whole sensor tick
(none stalled), each the best of 5.
"""

import argparse
import tempfile
import time
from typing import Any

import dagster as dg
from common import best
from dagster._core.test_utils import create_run_for_test

from longrun_dagster.sensors import LIVE, stalled_run_sensor
from longrun_dagster.tags import HEARTBEAT as HEARTBEAT_TAG
from longrun_dagster.tags import STAGE_RUN as STAGE_RUN_TAG


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", default="1,10,100")
    args = parser.parse_args()
    sensor = stalled_run_sensor(stall_timeout_seconds=3600)
    print(f"{'runs':>5} {'tags (1 query) ms':>18} {'newest event x N ms':>20} "
          f"{'sensor tick ms':>15}")
    for n in [int(x) for x in args.runs.split(",")]:
        with tempfile.TemporaryDirectory() as home:
            with dg.DagsterInstance.from_config(home) as instance:
                ids = []
                for i in range(n):
                    run = create_run_for_test(
                        instance, job_name="stage_job", status=dg.DagsterRunStatus.STARTED,
                        tags={STAGE_RUN_TAG: "true", "dagster/partition": f"p{i}",
                              HEARTBEAT_TAG: f"{time.time():.3f}|3/20|1|elsewhere"})
                    ids.append(run.run_id)
                    instance.report_engine_event("progress", run)
                print(f"{n:>5} " + measure(instance, ids, sensor))


def measure(instance: dg.DagsterInstance, ids: list[str], sensor: Any) -> str:
    filters = dg.RunsFilter(statuses=list(LIVE), tags={STAGE_RUN_TAG: "true"})
    tags = best(lambda: [r.tags[HEARTBEAT_TAG] for r in instance.get_runs(filters=filters)])
    events = best(lambda: [instance.get_records_for_run(i, limit=1, ascending=False)
                           for i in ids])
    context = dg.build_sensor_context(instance=instance)
    tick = best(lambda: list(sensor(context) or []))
    return f"{tags * 1e3:>18.1f} {events * 1e3:>20.1f} {tick * 1e3:>15.1f}"


if __name__ == "__main__":
    main()
