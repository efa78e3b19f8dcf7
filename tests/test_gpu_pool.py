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
