"""Range runs (``BackfillPolicy.single_run()``, the ``dagster/asset_partition_range_*``
tags): one model load, every partition its own attempt and its own materialization."""

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest

from longrun_dagster import AtomicObjectStoreIOManager, StageContext, StorageError, model_stage
from longrun_dagster.commit import PartitionStore
from longrun_dagster.storage import LocalStore
from tests.helpers import pipeline
from tests.helpers.pipeline import DAYS, Scored, load_model, score_batch, texts

ALL = ["2024-01-01", "2024-01-02", "2024-01-03", "2024-01-04"]
LOADS: list[str] = []
FAIL_IN: set[str] = set()


@pytest.fixture(autouse=True)
def clean() -> Iterator[None]:
    pipeline.CALLS.clear()
    LOADS.clear()
    FAIL_IN.clear()
    yield
    FAIL_IN.clear()


@pytest.fixture
def io(tmp_path: Path) -> AtomicObjectStoreIOManager:
    io = AtomicObjectStoreIOManager(base_uri=(tmp_path / "lr").as_uri())
    for day in ALL:
        assert dg.materialize([texts], partition_key=day, resources={"io_manager": io}).success
    return io


def counting_load(stage: StageContext) -> Any:
    LOADS.append(stage.run_id)
    return load_model(stage)


@model_stage(upstream=texts, schema=Scored, partitions_def=DAYS, batch_size=10,
             checkpoint_every_batches=3, max_bad_fraction=0.05, setup=counting_load,
             backfill_policy=dg.BackfillPolicy.single_run())
def scores(batch: pd.DataFrame, stage: StageContext) -> pd.DataFrame:
    if stage.partition_key in FAIL_IN and stage.batch_index == 7:
        raise RuntimeError(f"injected failure in {stage.partition_key}")
    return score_batch(batch, stage)


def run_range(io: AtomicObjectStoreIOManager, first: str, last: str
              ) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [texts, scores], selection=[scores], resources={"io_manager": io},
        raise_on_error=False,
        tags={"dagster/asset_partition_range_start": first,
              "dagster/asset_partition_range_end": last})


def run_one(io: AtomicObjectStoreIOManager, day: str) -> dg.ExecuteInProcessResult:
    return dg.materialize([texts, scores], selection=[scores], partition_key=day,
                          resources={"io_manager": io})


def materialized(result: dg.ExecuteInProcessResult) -> dict[str, dict[str, Any]]:
    events = [e for e in result.all_events if e.event_type_value == "ASSET_MATERIALIZATION"]
    out = {}
    for event in events:
        mat = event.event_specific_data.materialization  # type: ignore[union-attr]
        out[mat.partition] = {k: v.value for k, v in mat.metadata.items()}
    return out


def committed_runs(io: AtomicObjectStoreIOManager) -> dict[str, str | None]:
    parts = io.partition_store()
    return {day: (m.run_id if (m := parts.lookup(["scores"], day)) else None) for day in ALL}


def test_a_range_run_reuses_what_is_committed_and_loads_the_model_once(
        io: AtomicObjectStoreIOManager) -> None:
    """A single run over a range computed everything as one unpartitioned unit, skipped the
    per-partition reuse check, and failed at commit with a ConfigError, leaving checkpoints
    and a lease under _unpartitioned."""
    for day in ALL[1:3]:
        assert run_one(io, day).success
    before = committed_runs(io)
    LOADS.clear()
    pipeline.CALLS.clear()
    result = run_range(io, ALL[0], ALL[-1])
    assert result.success
    assert len(LOADS) == 1, "one model load for the whole range"
    assert len(pipeline.CALLS) == 2 * pipeline.ROWS // 10, "only the two missing partitions"
    after = committed_runs(io)
    assert after[ALL[1]] == before[ALL[1]] and after[ALL[2]] == before[ALL[2]]
    assert after[ALL[0]] == after[ALL[3]] == result.run_id
    meta = materialized(result)
    assert set(meta) == set(ALL)
    assert meta[ALL[0]]["reused"] is False and meta[ALL[0]]["model_calls"] == 20
    assert meta[ALL[1]]["reused"] is True  # with the committing run's figures
    assert meta[ALL[1]]["model_calls"] == 20 and meta[ALL[1]]["committed_by_run"] == \
        before[ALL[1]]
    assert meta[ALL[0]]["content_version"] != meta[ALL[3]]["content_version"], \
        "each partition its own metadata"
    root = Path(io.partition_store().store.uri_of("scores").removeprefix("file://"))
    assert not (root / "_unpartitioned").exists()
    assert not list(root.rglob("_checkpoints/*/*/cursor-*"))
    LOADS.clear()
    again = run_range(io, ALL[0], ALL[-1])
    assert again.success and LOADS == [], "nothing to compute: no model load"


def test_a_failure_mid_range_keeps_earlier_partitions_and_a_relaunch_continues(
        io: AtomicObjectStoreIOManager) -> None:
    """A failure in partition k must not lose the partitions committed before it; the
    relaunch reuses them and resumes k from its checkpoint."""
    FAIL_IN.add(ALL[2])
    failed = run_range(io, ALL[0], ALL[-1])
    assert not failed.success
    committed = committed_runs(io)
    assert committed[ALL[0]] == committed[ALL[1]] == failed.run_id
    assert committed[ALL[2]] is None and committed[ALL[3]] is None
    assert set(materialized(failed)) == {ALL[0], ALL[1]}, "reported though the run failed"
    FAIL_IN.clear()
    LOADS.clear()
    pipeline.CALLS.clear()
    relaunch = run_range(io, ALL[0], ALL[-1])
    assert relaunch.success and len(LOADS) == 1
    after = committed_runs(io)
    assert after[ALL[0]] == failed.run_id and after[ALL[1]] == failed.run_id
    assert after[ALL[2]] == after[ALL[3]] == relaunch.run_id
    resumed = materialized(relaunch)[ALL[2]]["resumed_from_batch"]
    assert resumed == 7, "partition k resumed after the last batch it completed"
    assert len(pipeline.CALLS) == (20 - 7) + 20


def test_range_output_equals_single_partition_runs(io: AtomicObjectStoreIOManager,
                                                   tmp_path: Path) -> None:
    """A partition computed in a range run is the same partition, byte for byte, with the
    same fingerprint, as one computed in its own run (so either reuses the other)."""
    assert run_range(io, ALL[0], ALL[1]).success
    single = AtomicObjectStoreIOManager(base_uri=(tmp_path / "single").as_uri())
    for day in ALL[:2]:
        assert dg.materialize([texts], partition_key=day, resources={"io_manager": single})
        assert run_one(single, day).success
    for day in ALL[:2]:
        a = io.partition_store().lookup(["scores"], day)
        b = single.partition_store().lookup(["scores"], day)
        assert a is not None and b is not None
        assert a.fingerprint == b.fingerprint and a.objects[0].digest == b.objects[0].digest


def test_the_sensor_relaunches_a_range_run_over_the_same_range() -> None:
    """A stalled range run was relaunched for no partition (it has no dagster/partition
    tag), so the relaunch recomputed nothing it was asked to; it now continues the range."""
    from longrun_dagster.recovery import Relaunch
    from longrun_dagster.sensors import RANGE_END_TAG, RANGE_START_TAG, RunView, _request

    run = dg.DagsterRun(job_name="j", run_id="r1", asset_selection=frozenset(
        {dg.AssetKey("scores")}), tags={RANGE_START_TAG: ALL[0], RANGE_END_TAG: ALL[-1]})
    view = RunView.of(run, created_at=1.0, partitions=ALL)
    assert view.partition_range == (ALL[0], ALL[-1]) and view.partitions == tuple(ALL)
    assert view.partition == f"{ALL[0]}...{ALL[-1]}"
    request = _request(Relaunch(view, tuple(ALL), 2, 1, "stalled"))
    assert request.partition_key is None
    assert request.tags[RANGE_START_TAG] == ALL[0] and request.tags[RANGE_END_TAG] == ALL[-1]
    assert request.asset_selection == [dg.AssetKey("scores")]


def check_verdicts(result: dg.ExecuteInProcessResult) -> dict[str | None, bool]:
    return {e.partition: e.passed for e in
            (ev.event_specific_data for ev in result.all_events
             if ev.event_type_value == "ASSET_CHECK_EVALUATION")}  # type: ignore[union-attr]


def test_the_schema_check_is_partitioned_one_verdict_per_partition(
        io: AtomicObjectStoreIOManager) -> None:
    """The check had no partitions definition: the UI showed one verdict for all days, and
    the latest partition's overwrote the others."""
    [spec] = scores.check_specs
    assert spec.partitions_def == DAYS
    FAIL_IN.add(ALL[-1])  # a range failing in its last day: a verdict for each committed
    try:
        failed = run_range(io, ALL[0], ALL[-1])
    finally:
        FAIL_IN.discard(ALL[-1])
    assert not failed.success
    assert check_verdicts(failed) == {d: True for d in ALL[:-1]}
    assert check_verdicts(run_one(io, ALL[-1])) == {ALL[-1]: True}
    assert check_verdicts(run_range(io, ALL[0], ALL[-1])) == {d: True for d in ALL}


class _FailingCommitStore(LocalStore):
    """A local store whose commit of one partition's last batches fails after a while (a
    disk or an endpoint gone), while the run computes the next partition."""

    def put(self, key: str, data: Any, **kw: Any) -> Any:
        leaf = key.rpartition("/")[2]
        if "/p=2024-01-02/" in key and leaf.startswith("data-"):
            deadline = time.monotonic() + 60  # (commits that block the compute: fail)
            while len(pipeline.CALLS) < 42 and time.monotonic() < deadline:
                time.sleep(0.01)  # until the next partition is two batches in
            raise StorageError(f"injected: the commit of {key} failed")
        return super().put(key, data, **kw)


class _FailingCommitIO(AtomicObjectStoreIOManager):
    def _build(self) -> PartitionStore:
        return PartitionStore(_FailingCommitStore(Path(self.base_uri[len("file://"):])))


def test_a_failed_commit_stops_the_next_partition_and_reports_what_committed(
        io: AtomicObjectStoreIOManager, monkeypatch: pytest.MonkeyPatch) -> None:
    """A range run commits partition k while it computes k+1. When k's commit fails, the
    run stops k+1 at its next batch (checkpointed), fails with k's error, and reports the
    partitions committed before k; a rerun reuses them and resumes the others."""
    monkeypatch.setenv("BATCH_SLEEP", "0.05")
    failing = _FailingCommitIO(base_uri=io.base_uri)
    result = dg.materialize(
        [texts, scores], selection=[scores], resources={"io_manager": failing},
        raise_on_error=False,
        tags={"dagster/asset_partition_range_start": ALL[0],
              "dagster/asset_partition_range_end": ALL[2]})
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "injected: the commit of" in str(failure.event_specific_data.error)  # type: ignore[union-attr]
    assert set(materialized(result)) == {ALL[0]}
    assert committed_runs(io) == {ALL[0]: result.run_id, ALL[1]: None, ALL[2]: None,
                                  ALL[3]: None}
    third = len(pipeline.CALLS) - 40
    assert 0 < third < 20, f"the third partition ran {third} batches after the failure"
    pipeline.CALLS.clear()
    monkeypatch.setenv("BATCH_SLEEP", "0")
    again = run_range(io, ALL[0], ALL[2])
    assert again.success and len(pipeline.CALLS) == 20 - third, \
        "the rerun recomputed checkpointed batches"
