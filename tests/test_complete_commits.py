"""Issue 23, each case a reviewer found, reproduced as a user meets it: the committed
rows, their dtypes and index, and the run's outcome. Every test here failed on the main
before the ledger (DESIGN.md, "A commit that proves itself")."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
import pandera.pandas as pa
import pytest

from longrun_dagster import (
    AtomicObjectStoreIOManager,
    ConfigError,
    IncompleteCommit,
    StageContext,
    model_stage,
)
from longrun_dagster.batches import BatchFn, BatchLoop, Cadence, Outcome
from longrun_dagster.checkpoint import Checkpointer
from longrun_dagster.commit import PartitionStore
from longrun_dagster.errors import StorageError
from longrun_dagster.formats import parquet
from longrun_dagster.ledger import Ledger, Plan
from longrun_dagster.storage import LocalStore, PutResult

PART = "p1"
PARTS = dg.StaticPartitionsDefinition([PART])


class FailsOneShard(LocalStore):
    """A local store whose ``nth`` checkpoint shard write fails once (an S3 503)."""

    def __init__(self, root: Path, nth: int = 1) -> None:
        super().__init__(root)
        self.shards, self.nth = 0, nth

    def put(self, key: str, data: bytes | memoryview, *, if_absent: bool = False,
            if_match: str | None = None) -> PutResult:
        if "/shard-" in f"/{key}":
            self.shards += 1
            if self.shards == self.nth:
                raise StorageError("injected 503 on a shard write", uri=key)
        return super().put(key, data, if_absent=if_absent, if_match=if_match)


def loop(store: LocalStore, fn: BatchFn, frame: pd.DataFrame, schema: pa.DataFrameSchema,
         **kw: Any) -> Outcome:
    ckpt = Checkpointer(store, "ck/", background=True)
    return BatchLoop(fn, frame, batch_size=kw.pop("batch_size", 2), schema=schema,
                     checkpointer=ckpt, cadence=Cadence(every_batches=kw.pop("every", 3),
                                                        every_seconds=3600), **kw).run()


ROWS = pd.DataFrame({"id": [f"r{i:02d}" for i in range(24)], "x": np.arange(24.0)})
SCORED = pa.DataFrameSchema({"id": pa.Column(str), "y": pa.Column(float)}, strict=True)


def doubled(batch: pd.DataFrame, index: int) -> pd.DataFrame:
    return pd.DataFrame({"id": batch.id.to_numpy(), "y": batch.x.to_numpy() * 2})


# -- 1. one transient checkpoint write error --------------------------------------------


@pytest.mark.parametrize("nth", [1, 2, 3])
def test_a_failed_background_shard_write_never_loses_its_batches(tmp_path: Path,
                                                                  nth: int) -> None:
    """batch_size 2, every 3 batches, 24 rows: one shard write fails once. The attempt
    either fails or commits all 24 rows, and the retry commits all 24 rows."""
    store = FailsOneShard(tmp_path, nth)
    outcomes = []
    for _ in range(2):
        try:
            outcomes.append(loop(store, doubled, ROWS, SCORED))
        except StorageError:
            continue
    assert outcomes, "no attempt finished"
    for outcome in outcomes:
        assert list(outcome.output.id) == list(ROWS.id), outcome.output
        assert outcome.rows_in == 24 and outcome.rows_quarantined == 0
    assert store.shards >= nth


# -- 2. pandera's drop_invalid_rows ---------------------------------------------------------


def test_a_schema_that_drops_invalid_rows_is_refused_at_declaration() -> None:
    dropping = pa.DataFrameSchema({"y": pa.Column(float, pa.Check.ge(0))},
                                  drop_invalid_rows=True)
    with pytest.raises(ConfigError, match="drop_invalid_rows"):
        model_stage(upstream="numbers", schema=dropping)(lambda b, s: b)


def test_a_column_that_drops_invalid_rows_is_refused_at_declaration() -> None:
    dropping = pa.DataFrameSchema({"y": pa.Column(float, pa.Check.ge(0),
                                                  drop_invalid_rows=True)})
    with pytest.raises(ConfigError, match="drop_invalid_rows"):
        model_stage(upstream="numbers", schema=dropping)(lambda b, s: b)


# -- 3. fn reuses a buffer its output aliases ---------------------------------------------


def aliasing_model() -> BatchFn:
    staging = [0.0, 0.0]  # one staging buffer, refilled in place every call

    def fn(batch: pd.DataFrame, index: int) -> pd.DataFrame:
        staging[0], staging[1] = float(index), float(index) + 0.5
        return pd.DataFrame({"id": batch.id.to_numpy(), "pair": [staging] * len(batch)})

    return fn


@pytest.mark.parametrize("pipelined", [True, False])
def test_output_that_aliases_a_reused_buffer_commits_each_batch_own_values(
    tmp_path: Path, pipelined: bool
) -> None:
    schema = pa.DataFrameSchema({"id": pa.Column(str), "pair": pa.Column(object)})
    outcome = loop(LocalStore(tmp_path), aliasing_model(), ROWS, schema, pipelined=pipelined)
    want = [[float(i // 2), float(i // 2) + 0.5] for i in range(24)]
    assert [list(p) for p in outcome.output.pair] == want


def reused_matrix_model() -> BatchFn:
    staging = np.zeros((2, 3), dtype=np.float32)  # a pinned staging matrix, refilled

    def fn(batch: pd.DataFrame, index: int) -> pd.DataFrame:
        staging[:len(batch)] = index
        return pd.DataFrame({"id": batch.id.to_numpy(),
                             "embedding": list(staging[:len(batch)])})

    return fn


def held_rows_model() -> BatchFn:
    rows = list(np.zeros((2, 3), dtype=np.float32))  # keeps the row views, not the matrix

    def fn(batch: pd.DataFrame, index: int) -> pd.DataFrame:
        for row in rows:
            row[:] = index
        return pd.DataFrame({"id": batch.id.to_numpy(), "embedding": rows[:len(batch)]})

    return fn


def borrowed_buffer_model() -> BatchFn:
    memory = bytearray(2 * 3 * 4)  # the matrix's memory is a buffer the model refills

    def fn(batch: pd.DataFrame, index: int) -> pd.DataFrame:
        matrix = np.frombuffer(memory, dtype=np.float32).reshape(2, 3)
        matrix[:] = index
        return pd.DataFrame({"id": batch.id.to_numpy(),
                             "embedding": list(matrix[:len(batch)])})

    return fn


def fresh_rows_model(batch: pd.DataFrame, index: int) -> pd.DataFrame:
    matrix = np.full((len(batch), 3), index, dtype=np.float32)  # fresh each call
    return pd.DataFrame({"id": batch.id.to_numpy(), "embedding": list(matrix)})


@pytest.mark.parametrize("make", [reused_matrix_model, held_rows_model,
                                  borrowed_buffer_model, lambda: fresh_rows_model])
def test_embedding_rows_commit_each_batch_own_values_however_the_model_holds_them(
    tmp_path: Path, make: Callable[[], BatchFn]
) -> None:
    schema = pa.DataFrameSchema({"id": pa.Column(str), "embedding": pa.Column(object)})
    outcome = loop(LocalStore(tmp_path), make(), ROWS, schema)
    assert [list(e) for e in outcome.output.embedding] == [[i // 2] * 3 for i in range(24)]


# -- 4. dtypes do not depend on where an attempt was interrupted --------------------------


class Flaky:
    """A model with a nullable str column (all None in batch 0) and an int column; it
    raises once in batch ``fail_at``."""

    def __init__(self, fail_at: int | None) -> None:
        self.fail_at = fail_at

    def __call__(self, batch: pd.DataFrame, index: int) -> pd.DataFrame:
        if index == self.fail_at:
            self.fail_at = None
            raise RuntimeError("injected")
        note = [None] * len(batch) if index == 0 else [f"n{index}"] * len(batch)
        return pd.DataFrame({"id": batch.id.to_numpy(), "note": note,
                             "count": np.full(len(batch), index, dtype="int64")})


NOTED = pa.DataFrameSchema({"id": pa.Column(str), "note": pa.Column(str, nullable=True),
                            "count": pa.Column("int64")}, strict=True)


@pytest.mark.parametrize("fail_at", [4, 7, 11])
def test_a_resumed_attempt_commits_the_bytes_and_dtypes_of_a_clean_one(
    tmp_path: Path, fail_at: int
) -> None:
    clean = loop(LocalStore(tmp_path / "clean"), Flaky(None), ROWS, NOTED)
    flaky, store = Flaky(fail_at), LocalStore(tmp_path / "resumed")
    with pytest.raises(RuntimeError, match="injected"):
        loop(store, flaky, ROWS, NOTED)
    resumed = loop(store, flaky, ROWS, NOTED)
    assert resumed.resumed_from_batch > 0
    assert dict(resumed.output.dtypes) == dict(clean.output.dtypes)
    assert bytes(parquet.dumps(resumed.output)) == bytes(parquet.dumps(clean.output))


# -- the ledger: a commit that does not hold every batch is refused -----------------------


def test_a_commit_missing_a_batch_raises_incomplete_commit_and_commits_nothing(
    tmp_path: Path
) -> None:
    outcome = loop(LocalStore(tmp_path / "ck"), doubled, ROWS, SCORED)
    partitions = PartitionStore(LocalStore(tmp_path / "lr"))
    attempt = partitions.begin(["scores"], PART, run_id="r1", fingerprint="f" * 64)
    short = outcome.output.iloc[:-2]  # the last batch lost on the way
    with pytest.raises(IncompleteCommit, match=r"p1.*scores.*holds 22 rows, the ledger 24"):
        attempt.commit(short, ledger=outcome.ledger)
    assert partitions.lookup(["scores"], PART) is None


def test_a_ledger_that_skips_a_batch_is_refused_even_when_the_rows_add_up() -> None:
    ledger = Ledger(Plan(rows_in=6, batch_size=2))
    ledger.add(0, rows_out=2, rows_quarantined=0)
    ledger.add(2, rows_out=4, rows_quarantined=0)  # batch 1 never ran, 2 wrote twice
    with pytest.raises(IncompleteCommit) as raised:
        ledger.verify_commit(where="scores/p1", rows_out=6, rows_quarantined=0,
                             one_row_per_input=True)
    assert raised.value.missing_batches == [1]


# -- 6. an upstream's index reaches fn and the committed output ----------------------------


@dg.asset(partitions_def=PARTS)
def docs() -> pd.DataFrame:
    return pd.DataFrame({"text": ["a", "bb", "ccc", "dddd", "eeeee"]},
                        index=pd.Index(["d7", "d3", "d9", "d1", "d5"], name="doc_id"))


SEEN: list[list[str]] = []


class Lengths(pa.DataFrameModel):
    length: int

    class Config:
        strict = True


@model_stage(upstream=docs, schema=Lengths, partitions_def=PARTS, batch_size=2,
             checkpoint_every_batches=1)
def lengths(batch: pd.DataFrame, stage: StageContext) -> pd.DataFrame:
    SEEN.append(list(batch.index))
    return pd.DataFrame({"length": batch.text.str.len().astype("int64")}, index=batch.index)


def test_an_upstream_index_reaches_fn_and_the_committed_output(tmp_path: Path) -> None:
    SEEN.clear()
    io = AtomicObjectStoreIOManager(base_uri=(tmp_path / "lr").as_uri())
    result = dg.materialize([docs, lengths], partition_key=PART,
                            resources={"io_manager": io})
    assert result.success
    assert SEEN == [["d7", "d3"], ["d9", "d1"], ["d5"]]
    _, out = io.partition_store().load(["lengths"], PART)
    assert list(out.index) == ["d7", "d3", "d9", "d1", "d5"]
    assert out.index.name == "doc_id"
    assert list(out.length) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("keep", [
    lambda b: b.x % 2 == 0,  # evenly spaced: pandas makes the selection a RangeIndex
    lambda b: b.x % 3 != 0,  # irregular: an integer Index
    lambda b: b.x < 0,  # nothing
])
def test_a_filter_over_a_default_index_commits_a_plain_index_whatever_it_keeps(
    tmp_path: Path, keep: Callable[[pd.DataFrame], pd.Series]
) -> None:
    frame = pd.DataFrame({"x": np.arange(10, dtype="int64")})
    schema = pa.DataFrameSchema({"x": pa.Column("int64")})
    outcome = loop(LocalStore(tmp_path), lambda b, i: b[keep(b)], frame, schema,
                   batch_size=4, one_row_per_input=False)
    want = frame[keep(frame)].reset_index(drop=True)
    pd.testing.assert_frame_equal(outcome.output, want)
    assert isinstance(outcome.output.index, pd.RangeIndex)


def test_a_filter_over_labelled_rows_keeps_their_labels(tmp_path: Path) -> None:
    frame = pd.DataFrame({"x": np.arange(10, dtype="int64")},
                         index=pd.Index([f"d{i}" for i in range(10)], name="doc_id"))
    schema = pa.DataFrameSchema({"x": pa.Column("int64")})
    outcome = loop(LocalStore(tmp_path), lambda b, i: b[b.x % 2 == 0], frame, schema,
                   batch_size=4, one_row_per_input=False)
    assert list(outcome.output.index) == ["d0", "d2", "d4", "d6", "d8"]
    assert outcome.output.index.name == "doc_id"
