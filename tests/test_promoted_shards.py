"""The checkpoints are the commit: a stage's checkpoint shards become its committed data
objects, the commit writes only the batches after the last checkpoint and the record, and
the content version is defined over rows, so an interrupted attempt and an uninterrupted
one commit the same content (issue 26)."""

from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pandera.pandas as pa
import pytest

from longrun_dagster import (
    AtomicObjectStoreIOManager,
    CorruptObject,
    IncompleteCommit,
    LeaseLost,
)
from longrun_dagster.commit import PartitionStore
from longrun_dagster.formats import tables
from longrun_dagster.ledger import Ledger, Plan
from longrun_dagster.manifest import StoredObject
from longrun_dagster.storage import LocalStore
from tests.helpers import pipeline
from tests.helpers.pipeline import (
    clean_pipeline,  # noqa: F401 - autouse
    make_scores,
    texts,
)

DAY = "2024-01-02"
ASSET = ["scores"]


def io_at(tmp_path: Path, name: str) -> AtomicObjectStoreIOManager:
    return AtomicObjectStoreIOManager(base_uri=(tmp_path / name).as_uri())


def run(io: AtomicObjectStoreIOManager, assets: list[Any], **kw: Any
        ) -> dg.ExecuteInProcessResult:
    return dg.materialize(assets, resources={"io_manager": io}, partition_key=DAY,
                          raise_on_error=False, **kw)


def committed(io: AtomicObjectStoreIOManager, asset: list[str] = ASSET
              ) -> tuple[Any, pd.DataFrame]:
    return io.partition_store().load(asset, DAY)


def test_the_commit_promotes_the_checkpoint_shards_and_writes_each_row_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the commit re-encoded and wrote everything the checkpoints had already
    written (2 bytes written per committed byte, a third of the stage's wall after its
    last model call). Now the shards are the committed objects and the commit writes
    only the batches after the last checkpoint: each data byte is written once."""
    io = io_at(tmp_path, "lr")
    assert run(io, [texts]).success
    written: dict[str, int] = {}
    put = LocalStore.put

    def counting_put(self: LocalStore, key: str, data: Any, **kw: Any) -> Any:
        written[key] = written.get(key, 0) + memoryview(data).nbytes
        return put(self, key, data, **kw)

    monkeypatch.setattr(LocalStore, "put", counting_put)
    stage = make_scores(checkpoint_every_batches=3)  # 20 batches: shards at 3, 6 .. 18
    assert run(io, [texts, stage], selection=[stage]).success
    manifest, frame = committed(io)
    data = manifest.objects_of("data")
    assert [o.name.startswith("_checkpoints/") for o in data] == [True] * 6 + [False]
    assert [o.rows for o in data] == [30] * 6 + [20]
    assert manifest.format == "parquet-batches" and manifest.rows == len(frame) == 200
    assert list(frame.id) == [f"{DAY}-{i}" for i in range(200)]
    prefix = io.partition_store().prefix(ASSET, DAY)
    named = {prefix + o.name: o.size for o in manifest.objects}
    assert {key: written.get(key) for key in named} == named, "an object written twice"
    rest = sum(n for key, n in written.items()
               if key.startswith(prefix) and key.endswith(".parquet") and key not in named)
    assert rest <= 6 * 2 * 2048, \
        f"{rest} bytes of other Parquet written: more than each checkpoint's empty " \
        "quarantine and failure-case shards"


def test_an_interrupted_partition_commits_the_content_of_an_uninterrupted_one(
        tmp_path: Path) -> None:
    """A resumed attempt cuts its shards elsewhere (the interruption checkpointed at batch
    7, the next checkpoint comes at 10 batches later); its objects differ, but its rows,
    dtypes, values and content version are the uninterrupted ones."""
    clean = io_at(tmp_path, "clean")
    stage = make_scores(checkpoint_every_batches=10)
    assert run(clean, [texts, stage]).success
    io = io_at(tmp_path, "lr")
    pipeline.MISBEHAVE["raise"] = {7}
    assert not run(io, [texts, stage]).success
    pipeline.MISBEHAVE.clear()
    assert run(io, [texts, stage], selection=[stage]).success
    (want, want_frame), (got, got_frame) = committed(clean), committed(io)
    assert [o.rows for o in want.objects_of("data")] == [100, 100]
    assert [o.rows for o in got.objects_of("data")] == [70, 100, 30]
    pd.testing.assert_frame_equal(got_frame, want_frame)
    assert got.data_version == want.data_version
    assert got.content and got.fingerprint == want.fingerprint


def test_a_downstream_stage_is_reused_after_its_upstream_recomputed_through_a_resume(
        tmp_path: Path) -> None:
    """A refactor of the upstream stage (a new code version, the same output), computed
    through an interruption and a resume: the downstream stage sees the same content
    version and is reused, not recomputed."""
    io = io_at(tmp_path, "lr")
    calls: list[int] = []

    def grade(batch: pd.DataFrame, stage: Any) -> pd.DataFrame:
        calls.append(stage.batch_index)
        return pd.DataFrame({"id": batch.id.to_numpy(), "grade": (batch.score * 10).round()})

    def downstream(upstream: dg.AssetsDefinition) -> dg.AssetsDefinition:
        from longrun_dagster import model_stage
        schema = pa.DataFrameSchema({"id": pa.Column(str), "grade": pa.Column(float)})
        return model_stage(upstream=upstream, schema=schema, partitions_def=pipeline.DAYS,
                           batch_size=50, name="grades", code_version="1")(grade)

    first = make_scores(code_version="1")
    assert run(io, [texts, first, downstream(first)]).success and calls
    refactored = make_scores(code_version="2")
    pipeline.MISBEHAVE["raise"] = {12}
    assert not run(io, [texts, refactored], selection=[refactored]).success
    pipeline.MISBEHAVE.clear()
    calls.clear()
    pipeline.CALLS.clear()
    result = run(io, [texts, refactored, downstream(refactored)],
                 selection=[refactored, downstream(refactored)])
    assert result.success
    assert pipeline.CALLS and min(pipeline.CALLS) == 12, "the upstream resumed"
    assert calls == [], "the downstream stage was recomputed"
    assert pipeline.materialization_meta(result, "grades")["reused"] is True


def test_a_replaced_versions_promoted_shards_stay_readable_for_the_grace_period(
        tmp_path: Path) -> None:
    """Shards named by a committed version are live; when a new version replaces it,
    they are retired (a reader that looked the old version up can still read them) and
    collected only after the grace period."""
    io = io_at(tmp_path, "lr")
    assert run(io, [texts, make_scores(code_version="1")]).success
    partitions = io.partition_store()
    old = partitions.committed(ASSET, DAY)
    again = make_scores(code_version="2")
    assert run(io, [texts, again], selection=[again]).success
    new = partitions.committed(ASSET, DAY)
    assert new.fingerprint != old.fingerprint
    assert partitions.load_version(old).equals(partitions.load_version(new))
    report = partitions.collect_garbage(ASSET, older_than_s=0)
    assert report.objects_removed >= len(old.objects_of("data"))
    with pytest.raises(CorruptObject, match="is missing"):
        partitions.load_version(old)
    pd.testing.assert_frame_equal(partitions.load_version(new), committed(io)[1])


def test_a_superseded_attempt_cannot_publish_its_shards(tmp_path: Path) -> None:
    """A zombie that checkpointed shards and then lost its claim is refused at commit,
    and the record still names nothing of it."""
    partitions = PartitionStore(LocalStore(tmp_path / "s"))
    zombie = partitions.begin(ASSET, DAY, run_id="zombie", fingerprint="f")
    zombie.claim()
    ckpt, outcome, ledger = _checkpointed(zombie)
    live = partitions.begin(ASSET, DAY, run_id="live", fingerprint="f")
    live.claim()
    with pytest.raises(LeaseLost):
        zombie.commit_batches(ckpt, outcome, ledger=ledger)
    assert partitions.lookup(ASSET, DAY) is None


def test_a_vanished_shard_of_another_attempt_is_never_named(tmp_path: Path) -> None:
    """A shard restored from another attempt's folder that is gone by the commit: the
    commit refuses (it would name a missing object) and says which batches recompute."""
    partitions = PartitionStore(LocalStore(tmp_path / "s"))
    attempt = partitions.begin(ASSET, DAY, run_id="r", fingerprint="f")
    attempt.claim()
    ckpt, outcome, ledger = _checkpointed(attempt)
    foreign = outcome.shards[0][0].model_copy(update={"name": "a-other/shard-gone.parquet"})
    outcome.shards[0] = (foreign, outcome.shards[0][1])
    with pytest.raises(IncompleteCommit) as err:
        attempt.commit_batches(ckpt, outcome, ledger=ledger)
    assert err.value.missing_batches == [0, 1] and partitions.lookup(ASSET, DAY) is None


class _Outcome:
    def __init__(self, shards: list[tuple[StoredObject, tuple[int, int]]],
                 tail: list[Any]) -> None:
        self.shards, self.tail, self.dtypes = shards, tail, {}


def _checkpointed(attempt: Any) -> tuple[Any, _Outcome, Ledger]:
    """Batches 0 and 1 checkpointed as one shard, batch 2 left for the commit."""
    from longrun_dagster.formats import parquet

    frames = [pd.DataFrame({"id": [f"r{b}-{i}" for i in range(2)]}) for b in range(3)]
    batch_tables = [tables.table_of(f) for f in frames]
    ledger = Ledger(Plan(6, 2))
    for b, table in enumerate(batch_tables):
        ledger.add(b, 2, 0, digest=tables.digest(table))
    ckpt = attempt.checkpointer(background=False)
    shard = parquet.dumps_table(tables.concat(batch_tables[:2]))
    ckpt.save(2, new_shards=[("valid", shard, 4)])
    return ckpt, _Outcome(ckpt.shards("valid"), batch_tables[2:]), ledger


def test_a_tail_whose_rows_were_all_quarantined_commits(tmp_path: Path) -> None:
    """The batches after the last checkpoint (18 and 19) returned nothing valid (each
    quarantined whole): the commit took the tail for missing ("the output objects end at
    batch 17") and refused a partition within its budget."""
    io = io_at(tmp_path, "lr")
    pipeline.MISBEHAVE["short"] = {18, 19}
    stage = make_scores(max_bad_fraction=0.2)  # checkpoints at 3, 6 .. 18
    assert run(io, [texts, stage]).success
    manifest, frame = committed(io)
    assert len(frame) == manifest.rows == 180
    assert [o.rows for o in manifest.objects_of("data")] == [30] * 6
