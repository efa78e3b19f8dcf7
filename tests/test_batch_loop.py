"""BatchLoop driven directly (no Dagster): the output's shape, row numbers in failure
cases, resume, and a checkpoint store that fails once the batches are done."""

import logging
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pandera.pandas as pa
import pytest

from longrun_dagster.batches import BatchFn, BatchLoop, Cadence, Outcome, StageHook, StageRun
from longrun_dagster.checkpoint import Checkpointer
from longrun_dagster.errors import StorageError
from longrun_dagster.formats import parquet
from longrun_dagster.storage import LocalStore, ObjectStore
from longrun_dagster.validation import failure_sample

SCHEMA = pa.DataFrameSchema({
    "id": pa.Column(str, pa.Check.str_length(min_value=1)),
    "n": pa.Column("int64"),
    "score": pa.Column(float, pa.Check.in_range(0.0, 1.0)),
}, strict=True)
BATCH = 10
PREFIX = "ck/"


def inputs(rows: int = 60) -> pd.DataFrame:
    return pd.DataFrame({"id": [f"r{i}" for i in range(rows)],
                         "text": [f"text {i}" for i in range(rows)]})


def model(damage: dict[int, str] | None = None, *, bad_row: tuple[int, int] | None = None,
          raise_at: int | None = None) -> BatchFn:
    """Scores each input row; ``damage`` maps batch -> what goes wrong in its output,
    ``bad_row`` (batch, position) gets an out-of-range score, ``raise_at`` raises."""
    damage = damage or {}

    def fn(batch: pd.DataFrame, index: int) -> pd.DataFrame:
        if index == raise_at:
            raise RuntimeError(f"injected failure in batch {index}")
        rows = batch.index.to_numpy()
        out = pd.DataFrame({"id": batch.id.to_numpy(), "n": rows.astype("int64"),
                            "score": (rows % 7) / 7.0})
        if bad_row is not None and index == bad_row[0]:
            out.loc[bad_row[1], "score"] = 7.5
        kind = damage.get(index)
        if kind == "short":
            out = out.iloc[:-3]
        elif kind == "wrong_dtype":
            out["n"] = out["n"].astype(str)
        elif kind == "extra_column":
            out["debug"] = 1.5
        elif kind == "missing_column":
            out = out.drop(columns=["n"])
        return out

    return fn


def run(store: ObjectStore, fn: BatchFn, frame: pd.DataFrame, *, every: int = 2,
        schema: pa.DataFrameSchema = SCHEMA, hooks: Sequence[StageHook] = (),
        one_row_per_input: bool = True, ckpt: Checkpointer | None = None) -> Outcome:
    """One attempt, checkpointing in the background as stages do."""
    ckpt = ckpt or Checkpointer(store, PREFIX, background=True)
    loop = BatchLoop(fn, frame, batch_size=BATCH, schema=schema, checkpointer=ckpt,
                     cadence=Cadence(every_batches=every, every_seconds=3600), hooks=hooks,
                     one_row_per_input=one_row_per_input)
    return loop.run()


def resumed(store: ObjectStore, make: Callable[..., BatchFn], frame: pd.DataFrame,
            stop_at: int, **kw: Any) -> Outcome:
    """A first attempt that fails in batch ``stop_at``, then one that resumes there."""
    with pytest.raises(RuntimeError, match="injected"):
        run(store, make(raise_at=stop_at), frame, **kw)
    outcome = run(store, make(), frame, **kw)
    assert outcome.resumed_from_batch == stop_at
    return outcome


def same_bytes(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    return bytes(parquet.dumps(a)) == bytes(parquet.dumps(b))


# -- a bad batch must not change the output's columns or dtypes --------------------------


@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("damage", ["short", "wrong_dtype", "extra_column", "missing_column"])
def test_bad_batch_in_the_middle_keeps_output_schema(
    tmp_path: Path, damage: str, every: int
) -> None:
    """A batch quarantined whole (wrong number of rows, or a frame-wide failure) put an
    empty slice of the input (or of its bad output) among the valid frames: the input's
    columns leaked into the output as all-NaN, int64 became float64, and the committed
    output failed the stage's own schema."""
    frame = inputs()
    clean = run(LocalStore(tmp_path / "clean"), model(), frame)
    make = partial(model, {2: damage})
    whole = run(LocalStore(tmp_path / "whole"), make(), frame, every=every)
    again = resumed(LocalStore(tmp_path / "resumed"), make, frame, stop_at=4, every=every)
    for outcome in (whole, again):
        SCHEMA.validate(outcome.output)
        assert outcome.output.dtypes.to_dict() == clean.output.dtypes.to_dict()
        assert len(outcome.output) == 50 and outcome.rows_quarantined == 10
        assert 25 not in set(outcome.output.n)
    assert same_bytes(whole.output, again.output)
    assert same_bytes(whole.quarantine, again.quarantine)


@pytest.mark.parametrize("every", [1, 2])
def test_every_batch_wrong_length_gives_empty_output_of_the_schema(
    tmp_path: Path, every: int
) -> None:
    """With every batch quarantined for its length, the output was an empty slice of the
    input (its columns, not the schema's); it must be empty with the schema's columns and
    dtypes, the same bytes whether resumed or not."""
    frame = inputs()
    clean = run(LocalStore(tmp_path / "clean"), model(), frame)
    make = partial(model, dict.fromkeys(range(6), "short"))
    whole = run(LocalStore(tmp_path / "whole"), make(), frame, every=every)
    again = resumed(LocalStore(tmp_path / "resumed"), make, frame, stop_at=3, every=every)
    for outcome in (whole, again):
        SCHEMA.validate(outcome.output)
        assert len(outcome.output) == 0 and outcome.rows_quarantined == 60
        assert list(outcome.output.columns) == list(SCHEMA.columns)
        assert outcome.output.dtypes.to_dict() == clean.output.dtypes.to_dict()
    assert same_bytes(whole.output, again.output)


@pytest.mark.parametrize("every", [1, 2])
def test_column_without_dtype_keeps_the_dtype_of_its_values(tmp_path: Path, every: int) -> None:
    """A schema column without a dtype has no dtype for an empty batch to take; the empty
    frame's placeholder (object) must not turn the other batches' int64 into object."""
    schema = SCHEMA.add_columns({"extra": pa.Column()})

    def make(**kw: Any) -> BatchFn:
        inner = model({1: "short"}, **kw)
        return lambda batch, index: inner(batch, index).assign(extra=7)

    frame = inputs()
    whole = run(LocalStore(tmp_path / "whole"), make(), frame, schema=schema, every=every)
    again = resumed(LocalStore(tmp_path / "resumed"), make, frame, stop_at=3, schema=schema,
                    every=every)
    for outcome in (whole, again):
        schema.validate(outcome.output)
        assert outcome.output.extra.dtype == np.dtype("int64")
    assert same_bytes(whole.output, again.output)


# -- row numbers -------------------------------------------------------------------------


@pytest.mark.parametrize("stop_at", [None, 2, 3])
def test_failure_row_is_the_row_of_the_partition(tmp_path: Path, stop_at: int | None) -> None:
    """Failure cases reported the row's position inside its batch (4), which users read as
    the partition's row; a failure in batch 3 at position 4 is row 34, also after resume."""
    frame = inputs()
    make = partial(model, bad_row=(3, 4))
    store = LocalStore(tmp_path)
    outcome = run(store, make(), frame) if stop_at is None else \
        resumed(store, make, frame, stop_at=stop_at)
    assert [c["row"] for c in failure_sample(outcome.failure_cases)] == [34]
    assert list(outcome.quarantine.position) == [34]
    assert list(outcome.quarantine.batch) == [3]


@pytest.mark.parametrize("stop_at", [None, 2, 3])
def test_failure_row_counts_output_rows_of_earlier_batches(
    tmp_path: Path, stop_at: int | None
) -> None:
    """Without one row per input, a row's number counts the output rows before it: batch 1
    returns 7 rows, so position 4 of batch 3 is row 10 + 7 + 10 + 4 = 31."""
    frame = inputs()
    make = partial(model, {1: "short"}, bad_row=(3, 4))
    store = LocalStore(tmp_path)
    outcome = run(store, make(), frame, one_row_per_input=False) if stop_at is None else \
        resumed(store, make, frame, stop_at=stop_at, one_row_per_input=False)
    assert [c["row"] for c in failure_sample(outcome.failure_cases)] == [31]
    assert list(outcome.quarantine.position) == [31]


# -- a checkpoint store that fails at the end --------------------------------------------


class FillingStore(LocalStore):
    """A local store whose writes fail, as on a full disk, once ``full`` is set."""

    full = False

    def put(self, key: str, data: bytes | memoryview, **kw: Any) -> Any:
        if self.full:
            raise StorageError(f"could not write {self.uri_of(key)}: [Errno 28] No space "
                               "left on device", uri=self.uri_of(key))
        return super().put(key, data, **kw)


class Recorder:
    """A hook that records its calls; ``after_batch`` runs after the given batch."""

    def __init__(self, after_batch: tuple[int, Callable[[], None]] | None = None,
                 end_error: Exception | None = None) -> None:
        self.calls: list[str] = []
        self.after_batch = after_batch
        self.end_error = end_error

    def on_prepare(self, run: StageRun) -> None:
        self.calls.append("prepare")

    def on_start(self, run: StageRun) -> None:
        self.calls.append("start")

    def on_batch(self, run: StageRun) -> None:
        if self.after_batch and run.progress.batches_done == self.after_batch[0] + 1:
            self.after_batch[1]()

    def on_end(self, run: StageRun) -> dict[str, Any]:
        self.calls.append("end")
        if self.end_error is not None:
            raise self.end_error
        return {"recorded": True}


def filled(store: FillingStore, ckpt: Checkpointer) -> Callable[[], None]:
    """Fill the store once the write in flight has landed: only later writes fail."""

    def fill() -> None:
        ckpt.flush()
        store.full = True

    return fill


def test_failed_final_checkpoint_write_still_finishes_the_stage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The last checkpoint write failed in the background and ``close()`` raised inside
    ``finally``: no hook's ``on_end`` ran, so the watchdog a hook started kept running and
    later hard-exited (os._exit(70)) a stage whose batches were all done."""
    store = FillingStore(tmp_path)
    ckpt = Checkpointer(store, PREFIX, background=True)
    hook = Recorder(after_batch=(5, filled(store, ckpt)))
    with caplog.at_level(logging.ERROR):
        outcome = run(store, model(), inputs(), every=1, hooks=[hook], ckpt=ckpt)
    assert hook.calls == ["prepare", "start", "end"]
    assert len(outcome.output) == 60 and outcome.hook_metadata == {"recorded": True}
    assert "No space left on device" in caplog.text


def test_failed_checkpoint_write_does_not_hide_the_loops_error(tmp_path: Path) -> None:
    """When the loop raised and the checkpoint write failed too, ``close()``'s StorageError
    replaced the loop's own error and no hook's ``on_end`` ran."""
    store = FillingStore(tmp_path)
    ckpt = Checkpointer(store, PREFIX, background=True)
    hook = Recorder(after_batch=(2, filled(store, ckpt)))
    with pytest.raises(RuntimeError, match="injected failure in batch 3"):
        run(store, model(raise_at=3), inputs(), every=1, hooks=[hook], ckpt=ckpt)
    assert hook.calls == ["prepare", "start", "end"]


def test_every_hook_ends_though_one_fails(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A hook whose ``on_end`` raised kept the hooks after it from ending (and stopping
    their threads)."""
    broken = Recorder(end_error=RuntimeError("heartbeat store unreachable"))
    after = Recorder()
    with caplog.at_level(logging.ERROR):
        outcome = run(LocalStore(tmp_path), model(), inputs(), hooks=[broken, after])
    assert broken.calls[-1] == "end" and after.calls[-1] == "end"
    assert outcome.hook_metadata == {"recorded": True}
    assert "heartbeat store unreachable" in caplog.text


# -- a checkpoint of another input -------------------------------------------------------


def test_checkpoint_of_other_input_is_left_in_place(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A checkpoint that did not match the input was cleared, deleting every checkpoint
    under the prefix, other attempts' included; it must only be skipped."""
    store = LocalStore(tmp_path)
    with pytest.raises(RuntimeError, match="injected"):
        run(store, model(raise_at=4), inputs(60))
    before = {i.key for i in store.list(PREFIX)}
    seen: list[set[str]] = []
    inner = model()

    def fn(batch: pd.DataFrame, index: int) -> pd.DataFrame:
        if index == 0:
            seen.append({i.key for i in store.list(PREFIX)})
        return inner(batch, index)

    with caplog.at_level(logging.WARNING):
        outcome = run(store, fn, inputs(30), every=100)
    assert seen == [before]
    assert outcome.model_calls == 3 and outcome.resumed_from_batch == 0
    assert "does not match this input" in caplog.text


def test_skipped_checkpoint_does_not_leak_into_the_next(tmp_path: Path) -> None:
    """Skipping another input's checkpoint must not carry its shards into this attempt's
    checkpoints, or a later resume would commit the other input's rows."""
    store = LocalStore(tmp_path)
    with pytest.raises(RuntimeError, match="injected"):
        run(store, model(raise_at=2), inputs(50), every=1)
    frame = inputs(30)
    with pytest.raises(RuntimeError, match="injected"):
        run(store, model(raise_at=2), frame, every=1)
    outcome = run(store, model(), frame, every=1)
    assert outcome.resumed_from_batch == 2
    clean = run(LocalStore(tmp_path / "clean"), model(), frame, every=1)
    assert same_bytes(outcome.output, clean.output)
