"""model_stage through Dagster's materialize(): reuse, recompute, quarantine, budget,
resume after an exception, time-boxed segments, checkpoint clean-up."""

import json
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest

from longrun_dagster import AtomicObjectStoreIOManager, LongrunError, ValidationFailed
from longrun_dagster import tags as T
from longrun_dagster.commit import PartitionStore
from tests.helpers import pipeline
from tests.helpers.pipeline import (
    clean_pipeline,  # noqa: F401 - autouse
    make_scores,
    scores,
    summary,
    texts,
)

DAY = "2024-01-02"


@pytest.fixture
def io(tmp_path: Path) -> AtomicObjectStoreIOManager:
    return AtomicObjectStoreIOManager(base_uri=(tmp_path / "lr").as_uri())


def run(io: AtomicObjectStoreIOManager, assets: list[Any] | None = None,
        **kw: Any) -> dg.ExecuteInProcessResult:
    assets = assets or [texts, scores]
    kw.setdefault("partition_key", DAY)
    return dg.materialize(assets, resources={"io_manager": io}, raise_on_error=False, **kw)


def meta(result: dg.ExecuteInProcessResult, asset: str = "scores") -> dict[str, Any]:
    return pipeline.materialization_meta(result, asset)


def committed_sha(io: AtomicObjectStoreIOManager, asset: str = "scores") -> str:
    return pipeline.committed_sha(io, DAY, asset)


def test_recommit_reuses_without_calling_the_model(io: AtomicObjectStoreIOManager) -> None:
    first = run(io)
    assert first.success and len(pipeline.CALLS) == 20
    assert meta(first)["reused"] is False and meta(first)["model_calls"] == 20
    pipeline.CALLS.clear()
    again = run(io, selection=[scores])
    assert again.success and pipeline.CALLS == []
    m = meta(again)
    assert m["reused"] is True and m["committed_by_run"] == first.run_id
    assert m["model_calls"] == 20  # the figures of the run that computed it, for the plots


def test_changing_the_code_version_recomputes(io: AtomicObjectStoreIOManager) -> None:
    assert run(io).success
    pipeline.CALLS.clear()
    v2 = make_scores(code_version="2")
    result = run(io, [texts, v2], selection=[v2])
    assert result.success and len(pipeline.CALLS) == 20 and meta(result)["reused"] is False


def test_changed_upstream_data_recomputes(io: AtomicObjectStoreIOManager) -> None:
    assert run(io).success
    pipeline.CALLS.clear()
    assert run(io, selection=[texts]).success  # same rows, but a new commit of the same data
    assert run(io, selection=[scores]).success
    assert pipeline.CALLS == []  # same bytes upstream -> same data version -> reused


@pytest.mark.parametrize("kind,bad_rows", [
    ("nan", 1), ("empty_id", 2), ("out_of_range", 1), ("wrong_dtype", 10),
    ("extra_column", 10), ("missing_column", 10), ("short", 10),
])
def test_malformed_output_under_budget_is_quarantined(
    io: AtomicObjectStoreIOManager, kind: str, bad_rows: int
) -> None:
    pipeline.MISBEHAVE[kind] = {4}
    result = run(io)
    assert result.success
    m = meta(result)
    assert m["rows_quarantined"] == bad_rows
    assert m["rows"] == 200 - bad_rows
    assert m["failure_sample"], "a quarantine must say why"
    _, quarantine = io.partition_store().load(["scores"], DAY, role="quarantine")
    assert len(quarantine) == bad_rows and set(quarantine.batch) == {4}
    assert all(json.loads(f) for f in quarantine.failures)
    [check] = result.get_asset_check_evaluations()
    assert check.passed


def test_over_budget_fails_clearly_commits_nothing_and_blocks_downstream(
    io: AtomicObjectStoreIOManager,
) -> None:
    """Bad model output past the budget must not reach the next model."""
    pipeline.MISBEHAVE["wrong_dtype"] = {0, 1, 2}
    result = run(io, [texts, scores, summary])
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure
                   and e.step_key == "scores")
    message = failure.step_failure_data.error.message  # type: ignore[union-attr]
    for part in ("scores", DAY, "30 of 200", "15.0%", "5.0%", "score",
                 "raise max_bad_fraction", "an edit to fn", "re-running unchanged"):
        assert part in message, (part, message)
    assert io.partition_store().lookup(["scores"], DAY) is None
    assert -1 not in pipeline.CALLS, "downstream ran on bad data"
    [check] = result.get_asset_check_evaluations()
    assert not check.passed


def test_over_budget_raises_a_catchable_validation_failed(
    io: AtomicObjectStoreIOManager,
) -> None:
    """``dg.materialize`` raises the stage's failure as it is: a caller catches
    ``ValidationFailed`` with its figures, and it is a ``dg.Failure`` (its metadata in the
    run's failure event)."""
    pipeline.MISBEHAVE["wrong_dtype"] = {0, 1, 2}
    with pytest.raises(ValidationFailed) as raised:
        dg.materialize([texts, scores], partition_key=DAY, resources={"io_manager": io})
    failed = raised.value
    assert isinstance(failed, dg.Failure) and isinstance(failed, LongrunError)
    assert (failed.asset, failed.partition, failed.rows_checked, failed.rows_invalid) == (
        "scores", DAY, 200, 30)
    assert failed.failure_cases and failed.failure_cases[0]["column"] == "score"
    assert failed.metadata["rows_quarantined"].value == 30
    assert "raise max_bad_fraction" in str(failed)


def test_a_finished_checkpoint_does_not_load_the_model_again(
    io: AtomicObjectStoreIOManager,
) -> None:
    """Every batch done (checkpointed) but not committed: a rerun needs no model."""
    loads: list[str] = []

    def counting_setup(stage: Any) -> Any:
        loads.append(stage.run_id)
        return pipeline.load_model(stage)

    stage = make_scores(setup=counting_setup)
    pipeline.MISBEHAVE["wrong_dtype"] = {0, 1, 2}  # over budget: all batches, no commit
    assert not run(io, [texts, stage]).success and len(loads) == 1
    pipeline.CALLS.clear()
    again = run(io, [texts, stage], selection=[stage])
    assert not again.success and len(loads) == 1 and pipeline.CALLS == []


def test_over_budget_then_a_raised_budget_commits_from_the_checkpoint(
    io: AtomicObjectStoreIOManager,
) -> None:
    """The failure said "fix the model output", but a rerun restored the finished checkpoint
    and failed the same way; the message now says what recomputes. Raising the budget (part
    of the fingerprint, so a tightened schema or budget is never reused) commits from the
    checkpoint without calling the model."""
    pipeline.MISBEHAVE["wrong_dtype"] = {0, 1, 2}
    assert not run(io, [texts, make_scores()]).success
    pipeline.CALLS.clear()
    relaxed = make_scores(max_bad_fraction=0.2)
    result = run(io, [texts, relaxed], selection=[relaxed])
    assert result.success and pipeline.CALLS == []
    assert meta(result)["model_calls"] == 0 and meta(result)["rows_quarantined"] == 30
    tightened = make_scores(max_bad_fraction=0.1)
    again = run(io, [texts, tightened], selection=[tightened])
    assert not again.success, "a tightened budget must not reuse what it would reject"


def test_exception_mid_partition_resumes_byte_identical(
    io: AtomicObjectStoreIOManager, tmp_path: Path
) -> None:
    clean = AtomicObjectStoreIOManager(base_uri=(tmp_path / "clean").as_uri())
    assert run(clean).success
    pipeline.CALLS.clear()
    pipeline.MISBEHAVE["raise"] = {13}
    assert not run(io).success
    assert pipeline.CALLS[-1] == 13
    pipeline.MISBEHAVE.clear()
    pipeline.CALLS.clear()
    resumed = run(io, selection=[scores])
    assert resumed.success
    assert pipeline.CALLS == list(range(13, 20)), "completed batches must not be recomputed"
    assert meta(resumed)["resumed_from_batch"] == 13
    assert committed_sha(io) == committed_sha(clean)


def test_checkpoints_are_deleted_once_committed(io: AtomicObjectStoreIOManager) -> None:
    """Once committed, what is left under _checkpoints/ is exactly the shards the commit
    promoted to data objects: no cursor, no shard of another attempt."""
    pipeline.MISBEHAVE["raise"] = {7}
    run(io)
    store = io.partition_store()
    prefix = store.prefix(["scores"], DAY)
    checkpoints = prefix + "_checkpoints/"
    assert any("cursor-" in i.key for i in store.store.list(checkpoints))
    pipeline.MISBEHAVE.clear()
    assert run(io, selection=[scores]).success
    left = {i.key[len(prefix):] for i in store.store.list(checkpoints)}
    promoted = {o.name for o in store.committed(["scores"], DAY).objects_of("data")}
    assert left and left == {name for name in promoted if name.startswith("_checkpoints/")}


def test_time_budget_ends_segments_that_resume_to_the_same_output(
    io: AtomicObjectStoreIOManager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A platform job cap: each run does what fits, checkpoints, and asks to continue."""
    clean = AtomicObjectStoreIOManager(base_uri=(tmp_path / "clean").as_uri())
    assert run(clean).success
    monkeypatch.setenv("BATCH_SLEEP", "0.1")
    boxed = make_scores(time_budget_seconds=1.6)
    instance = dg.DagsterInstance.ephemeral()
    assert run(io, [texts], instance=instance).success
    segments = 0
    while True:
        segments += 1
        assert segments <= 21, "every segment completes a batch (20 batches)"
        result = run(io, [texts, boxed], selection=[boxed], instance=instance)
        if result.success:
            break
        tags = instance.get_run_by_id(result.run_id).tags  # type: ignore[union-attr]
        assert T.own(tags, result.run_id, None).get(T.CONTINUATION) == "requested"
    assert segments >= 2
    assert committed_sha(io) == committed_sha(clean)


def test_stage_without_our_io_manager_is_a_clear_config_error(tmp_path: Path) -> None:
    result = dg.materialize([texts, scores], partition_key=DAY, raise_on_error=False,
                            resources={"io_manager": dg.FilesystemIOManager(
                                base_dir=str(tmp_path))})
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "AtomicObjectStoreIOManager" in str(failure.step_failure_data.error)  # type: ignore[union-attr]


def test_missing_upstream_partition_names_it(io: AtomicObjectStoreIOManager) -> None:
    result = run(io, selection=[scores])
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    text = str(failure.step_failure_data.error)  # type: ignore[union-attr]
    assert "texts" in text and DAY in text and "materialize it first" in text


def test_partition_store_read_of_quarantine_is_public(io: AtomicObjectStoreIOManager) -> None:
    pipeline.MISBEHAVE["nan"] = {0}
    assert run(io).success
    store: PartitionStore = io.partition_store()
    manifest = store.lookup(["scores"], DAY)
    assert manifest is not None and manifest.object("quarantine") is not None


def test_progress_is_logged_with_rate_and_eta(io: AtomicObjectStoreIOManager) -> None:
    chatty = make_scores(progress_every_seconds=0.0)
    instance = dg.DagsterInstance.ephemeral()
    result = run(io, [texts, chatty], instance=instance)
    assert result.success
    messages = [e.user_message for e in instance.all_logs(result.run_id)]
    progress = [m for m in messages if "rows/s" in m]
    assert progress and "ETA" in progress[0] and "/200 rows" in progress[0]


def test_unpartitioned_stage_over_an_unpartitioned_upstream(
    io: AtomicObjectStoreIOManager,
) -> None:
    """The upstream-partition lookup must handle assets without partitions."""

    @dg.asset
    def all_texts() -> pd.DataFrame:
        return pd.DataFrame({"id": [f"r{i}" for i in range(25)],
                                      "text": ["red green blue"] * 25})

    whole = make_scores(upstream=all_texts, partitions_def=None, name="whole_scores")
    first = dg.materialize([all_texts, whole], resources={"io_manager": io})
    assert first.success and meta(first, "whole_scores")["rows"] == 25
    pipeline.CALLS.clear()
    again = dg.materialize([all_texts, whole], resources={"io_manager": io},
                           selection=[whole])
    assert again.success and pipeline.CALLS == []
    assert meta(again, "whole_scores")["reused"] is True


def test_stage_over_date_by_shard_partitions(io: AtomicObjectStoreIOManager) -> None:
    """When one day outgrows one GPU, the README says to add a shard dimension; a stage
    must not depend on the partition key's shape ("2024-01-02|b" holds a '|')."""
    grid = dg.MultiPartitionsDefinition({
        "date": dg.DailyPartitionsDefinition(start_date="2024-01-01", end_date="2024-01-03"),
        "shard": dg.StaticPartitionsDefinition(["a", "b"]),
    })

    @dg.asset(partitions_def=grid)
    def shard_texts(context: dg.AssetExecutionContext) -> pd.DataFrame:
        key = context.partition_key
        return pd.DataFrame({"id": [f"{key}-{i}" for i in range(30)],
                             "text": [f"red {key} blue"] * 30})

    sharded = make_scores(upstream=shard_texts, partitions_def=grid, name="shard_scores")
    keys = [dg.MultiPartitionKey({"date": "2024-01-02", "shard": s}) for s in "ab"]
    for key in keys:
        done = dg.materialize([shard_texts, sharded], partition_key=key,
                              resources={"io_manager": io})
        assert done.success and meta(done, "shard_scores")["rows"] == 30
    committed = {k: pipeline.committed_sha(io, k, "shard_scores") for k in keys}
    assert len(set(committed.values())) == 2  # each shard its own data, none overwritten
    _, stored = io.partition_store().load(["shard_scores"], keys[1])
    assert set(stored.id.str.startswith("2024-01-02|b")) == {True}
    pipeline.CALLS.clear()
    again = dg.materialize([shard_texts, sharded], partition_key=keys[0],
                           resources={"io_manager": io}, selection=[sharded])
    assert again.success and pipeline.CALLS == []
    assert meta(again, "shard_scores")["reused"] is True
