"""Admission across runs: stages in the ``gpu`` pool never share the one slot."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from longrun_dagster import AtomicObjectStoreIOManager
from tests.helpers import pipeline

ROOT = Path(__file__).parent.parent


@pytest.mark.postgres
def test_two_partitions_contend_for_one_gpu_slot(tmp_path: Path, postgres_url: str) -> None:
    """Two runs of a stage in pool 'gpu' with one slot must run one after the other.

    On a PostgreSQL instance, as in production: on SQLite two processes that claimed the
    slot in the same few milliseconds were both let in (seen once in CI: steps starting
    5 ms apart)."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(
        f"storage:\n  postgres:\n    postgres_url: \"{postgres_url}\"\n")
    base_uri = (tmp_path / "lr").as_uri()
    days = ["2024-01-01", "2024-01-02"]
    io = AtomicObjectStoreIOManager(base_uri=base_uri)
    for day in days:
        assert dg.materialize([pipeline.texts], partition_key=day,
                              resources={"io_manager": io}).success
    env = {**os.environ, "DAGSTER_HOME": str(home), "BATCH_SLEEP": "0.1"}
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.event_log_storage.set_concurrency_slots("gpu", 1)  # as `dagster instance
        # concurrency set gpu 1` does
    procs = [subprocess.Popen([sys.executable, "-m", "tests.helpers.run_stage", base_uri, day],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for day in days]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert all("RESULT SUCCESS" in out for out in outputs), outputs
    with dg.DagsterInstance.from_config(str(home)) as instance:
        spans = []
        for run in instance.get_runs():
            events = {e.dagster_event.event_type_value: e.timestamp
                      for e in instance.all_logs(run.run_id) if e.dagster_event}
            spans.append((events["STEP_START"], events["STEP_SUCCESS"]))
    (first_start, first_end), (second_start, _) = sorted(spans)
    assert second_start >= first_end, f"two GPU steps overlapped: {sorted(spans)}"


@pytest.mark.postgres
def test_simultaneous_claims_of_one_slot_admit_one(tmp_path: Path, postgres_url: str) -> None:
    """Dagster's claim reads a free slot (SELECT ... FOR UPDATE SKIP LOCKED) and then
    updates it, on an autocommit connection: the row lock ends with the SELECT, so two
    steps that claim within the same milliseconds can both read the one free slot and both
    be CLAIMED. longrun_dagster makes the update a compare-and-set (only a slot still free
    is taken): of many simultaneous claims of one slot, exactly one wins."""
    import threading

    import longrun_dagster.stage  # noqa: F401 - importing it fixes the claim

    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(
        f"storage:\n  postgres:\n    postgres_url: \"{postgres_url}\"\n")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        storage = instance.event_log_storage
        storage.set_concurrency_slots("gpu", 1)
        for attempt in range(5):
            claimants = 8
            barrier = threading.Barrier(claimants)
            results: list[object] = []

            def claim(i: int, attempt: int, barrier: threading.Barrier,
                      results: list[object]) -> None:
                barrier.wait()
                results.append(storage._claim_concurrency_slot(
                    "gpu", f"run-{attempt}-{i}", "stage"))

            threads = [threading.Thread(target=claim, args=(i, attempt, barrier, results))
                       for i in range(claimants)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            won = [r for r in results if r.name == "CLAIMED"]
            assert len(won) == 1, f"attempt {attempt}: {len(won)} steps hold one slot"
            storage.free_concurrency_slots_for_run(
                next(f"run-{attempt}-{i}" for i in range(claimants)
                     if _holder(storage) == f"run-{attempt}-{i}"))


def _holder(storage: object) -> str | None:
    from dagster._core.storage.event_log.schema import ConcurrencySlotsTable

    with storage.index_connection() as conn:  # type: ignore[attr-defined]
        rows = conn.execute(ConcurrencySlotsTable.select().where(
            ConcurrencySlotsTable.c.concurrency_key == "gpu")).fetchall()
    return next((r.run_id for r in rows if r.run_id), None)
