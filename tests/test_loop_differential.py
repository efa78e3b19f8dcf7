"""A differential property test of the batch loop (issue 23; DESIGN.md, "A commit that
proves itself"): however an attempt is interrupted (the model raises, a checkpoint write
fails, SIGTERM preempts it, the process dies), the attempts that follow commit the bytes
of the oracle, the uninterrupted sequential run (``pipelined=False``, one attempt, a fresh
store), and their ledger covers every batch once with exactly the rows committed.

Hypothesis draws the input (int, float, str and bool columns, nullable str and int columns
whose None patterns differ between batches, sometimes a string index), the schema (which
columns it declares, strict or not, coercing or not), the model (one output row per input,
or a filter), the loop's options and the interruption. The committed frames are compared
as ``formats.parquet.dumps`` encodes them, since those bytes are what a commit writes.

CI runs a fixed (derandomized) set of examples in about a minute; ``LONGRUN_SLOW=1`` runs
2,000 random ones, and prints a ``@reproduce_failure`` blob for any failure.
"""

import math
import os
import pickle
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import pandera.pandas as pa
import pyarrow
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from longrun_dagster.batches import BatchLoop, Cadence, Outcome
from longrun_dagster.checkpoint import Checkpointer
from longrun_dagster.errors import Preempted, StorageError
from longrun_dagster.formats import parquet
from longrun_dagster.storage import LocalStore, PutResult

SLOW = os.environ.get("LONGRUN_SLOW") == "1"
ROOT = Path(__file__).parent.parent
PREFIX = "ck/"
MAX_ROWS = 60
OPTIONAL = ("flag", "note", "count")
"""Output columns a schema may leave undeclared (they pass through a non-strict one)."""


def _settings(ci_examples: int, slow_examples: int) -> settings:
    return settings(
        max_examples=slow_examples if SLOW else ci_examples,
        deadline=None,
        database=None,
        derandomize=not SLOW,  # CI: the same examples every run; slow: new ones
        print_blob=SLOW,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# -- what is drawn ---------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """The model's output and the schema that checks it."""

    declared: frozenset[str]
    """The optional columns the schema declares; a strict schema gets only these."""
    strict: bool
    coerce: bool
    counts_inferred: bool
    """The model returns ``count`` as a list of ints and Nones, leaving pandas to infer its
    dtype per batch (int64, float64 or object), instead of as a nullable ``Int64`` array."""
    one_row_per_input: bool
    """Else the model drops the rows whose ``n`` is a multiple of 3 (some batches return
    no rows at all)."""


@dataclass(frozen=True)
class Options:
    batch_size: int
    every_batches: int
    pipelined: bool
    background: bool
    attempt_folders: bool
    """Each attempt writes its own folder under the prefix, as stages do."""


@dataclass(frozen=True)
class Uninterrupted:
    pass


@dataclass(frozen=True)
class RaiseAt:
    """The first attempt's model raises in this batch; a second attempt finishes."""

    batch: int


@dataclass(frozen=True)
class FailPut:
    """The ``nth`` put to the store (from 1) fails once; attempts are rerun until one
    finishes (at most 3)."""

    nth: int


@dataclass(frozen=True)
class CrashAt:
    """The first attempt runs in a child process that exits hard (``os._exit``) in this
    batch; a second attempt, in this process, finishes."""

    batch: int


@dataclass(frozen=True)
class SigtermAt:
    """The process gets SIGTERM (a preemption) while the first attempt's model runs this
    batch; the loop checkpoints and raises ``Preempted``, and a second attempt finishes."""

    batch: int


Interruption = Uninterrupted | RaiseAt | FailPut | CrashAt | SigtermAt


@dataclass(frozen=True)
class Case:
    frame: pd.DataFrame = field(repr=False)
    shape: Shape
    options: Options
    interruption: Interruption

    def __repr__(self) -> str:
        index = "RangeIndex" if isinstance(self.frame.index, pd.RangeIndex) else \
            f"{self.frame.index.name}: {list(self.frame.index)}"
        return (f"Case(rows={len(self.frame)}, dtypes={self.frame.dtypes.astype(str).to_dict()}"
                f", index={index}, data={self.frame.to_dict('list')}, shape={self.shape}, "
                f"options={self.options}, interruption={self.interruption})")


def _nulls(draw: st.DrawFn, rows: int) -> list[bool]:
    """Where a nullable column is None: the pattern differs between batches on purpose,
    so a column can be all None in one batch and set in the next."""
    pattern = draw(st.sampled_from(["never", "always", "blocks", "drawn"]))
    if pattern == "blocks":
        block, phase = draw(st.integers(1, 8)), draw(st.integers(0, 1))
        return [(i // block) % 2 == phase for i in range(rows)]
    if pattern == "drawn":
        return draw(st.lists(st.booleans(), min_size=rows, max_size=rows))
    return [pattern == "always"] * rows


@st.composite
def inputs(draw: st.DrawFn) -> pd.DataFrame:
    rows = draw(st.integers(0, MAX_ROWS))
    ints = draw(st.lists(st.integers(-10**6, 10**6), min_size=rows, max_size=rows))
    scores = st.floats(-0.5, 1.5) | st.just(math.nan)  # out of [0, 1]: quarantined
    xs = draw(st.lists(scores, min_size=rows, max_size=rows))
    no_note, no_count = _nulls(draw, rows), _nulls(draw, rows)
    frame = pd.DataFrame({
        "doc": [f"d{i}" for i in range(rows)],
        "n": pd.Series(ints, dtype="int64"),
        "x": pd.Series(xs, dtype="float64"),
        "flag": pd.Series([v % 2 == 0 for v in ints], dtype="bool"),
        "note": pd.Series([None if null else f"note {v % 97}" for v, null in
                           zip(ints, no_note, strict=True)], dtype=object),
        "count": pd.array([None if null else v % 1000 for v, null in
                           zip(ints, no_count, strict=True)], dtype="Int64"),
    })
    if draw(st.booleans()):
        frame.index = pd.Index([f"doc-{i}" for i in range(rows)], dtype=object, name="doc_id")
    return frame


@st.composite
def cases(draw: st.DrawFn, interruptions: st.SearchStrategy[str]) -> Case:
    frame = draw(inputs())
    shape = Shape(
        declared=frozenset(draw(st.sets(st.sampled_from(OPTIONAL)))),
        strict=draw(st.booleans()), coerce=draw(st.booleans()),
        counts_inferred=draw(st.booleans()), one_row_per_input=draw(st.booleans()),
    )
    options = Options(
        batch_size=draw(st.integers(1, 8)), every_batches=draw(st.integers(1, 5)),
        pipelined=draw(st.booleans()), background=draw(st.booleans()),
        attempt_folders=draw(st.booleans()),
    )
    batches = -(-len(frame) // options.batch_size)
    kind = draw(interruptions)
    interruption: Interruption = Uninterrupted()
    if kind == "fail_put":
        interruption = FailPut(draw(st.integers(1, 40)))
    elif kind in ("raise", "crash", "sigterm") and batches:
        at = draw(st.integers(0, batches - 1))
        interruption = {"raise": RaiseAt, "crash": CrashAt, "sigterm": SigtermAt}[kind](at)
    return Case(frame, shape, options, interruption)


# -- the model and its schema ----------------------------------------------------------


class InjectedFailure(RuntimeError):
    pass


@dataclass(frozen=True)
class Model:
    """A deterministic model: its output derives from the batch alone."""

    shape: Shape
    raise_at: int | None = None
    crash_at: int | None = None
    sigterm_at: int | None = None

    def __call__(self, batch: pd.DataFrame, index: int) -> pd.DataFrame:
        if index == self.crash_at:
            os._exit(1)
        if index == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        if index == self.raise_at:
            raise InjectedFailure(f"injected failure in batch {index}")
        if not self.shape.one_row_per_input:
            batch = batch[batch["n"] % 3 != 0]
        counts = batch["count"].array
        out = pd.DataFrame({
            "doc": batch["doc"].to_numpy(),
            "n": (batch["n"] * 2).to_numpy(),
            "score": batch["x"].to_numpy(),
            "flag": batch["flag"].to_numpy(),
            "note": list(batch["note"]),
            "count": [None if pd.isna(v) else int(v) for v in counts]
            if self.shape.counts_inferred else counts,
        })
        if self.shape.strict:
            out = out.drop(columns=[c for c in OPTIONAL if c not in self.shape.declared])
        return out


def schema_of(shape: Shape) -> pa.DataFrameSchema:
    optional = {
        "flag": pa.Column(bool),
        "note": pa.Column(str, nullable=True),
        "count": pa.Column("Int64", nullable=True),
    }
    return pa.DataFrameSchema({
        "doc": pa.Column(str),
        "n": pa.Column("int64"),
        "score": pa.Column(float, pa.Check.in_range(0.0, 1.0)),
        **{name: column for name, column in optional.items() if name in shape.declared},
    }, strict=shape.strict, coerce=shape.coerce)


# -- running attempts --------------------------------------------------------------------


class FaultyStore(LocalStore):
    """A local store whose ``fail_at``-th put (from 1) raises ``StorageError``, once."""

    def __init__(self, root: Path, fail_at: int | None = None) -> None:
        super().__init__(root)
        self.fail_at, self.puts = fail_at, 0

    def put(self, key: str, data: bytes | memoryview, **kw: Any) -> PutResult:
        self.puts += 1
        if self.puts == self.fail_at:
            raise StorageError(f"injected: could not write {self.uri_of(key)}",
                               uri=self.uri_of(key))
        return super().put(key, data, **kw)


def attempt(store: LocalStore, case: Case, model: Model, number: int, *,
            oracle: bool = False) -> Outcome:
    """One attempt at the partition with a fresh checkpointer, as a rerun of a stage has."""
    o = case.options
    folder = f"attempt-{number}" if o.attempt_folders else None
    ckpt = Checkpointer(store, PREFIX, background=o.background and not oracle,
                        attempt=folder)
    loop = BatchLoop(model, case.frame, batch_size=o.batch_size, schema=schema_of(case.shape),
                     checkpointer=ckpt,
                     cadence=Cadence(every_batches=o.every_batches, every_seconds=3600),
                     one_row_per_input=case.shape.one_row_per_input,
                     pipelined=o.pipelined and not oracle)
    return loop.run()


def interrupted(root: Path, case: Case) -> Outcome:
    """The attempts ``case.interruption`` calls for; the outcome of the one that finishes."""
    model = Model(case.shape)
    store = LocalStore(root)
    match case.interruption:
        case Uninterrupted():
            return attempt(store, case, model, 0)
        case RaiseAt(batch):
            with pytest.raises(InjectedFailure):
                attempt(store, case, replace(model, raise_at=batch), 0)
            outcome = attempt(store, case, model, 1)
            assert outcome.resumed_from_batch <= batch
            return outcome
        case FailPut(nth):
            for number in range(3):
                try:
                    return attempt(FaultyStore(root, nth if number == 0 else None), case,
                                   model, number)
                except StorageError:
                    event("fail_put: an attempt failed")
            raise AssertionError("no attempt finished after a single failed put")
        case SigtermAt(batch):
            try:
                attempt(store, case, replace(model, sigterm_at=batch), 0)
            except Preempted:
                event("sigterm: the attempt stopped early")
            outcome = attempt(store, case, model, 1)
            assert outcome.resumed_from_batch <= batch + 1
            return outcome
        case CrashAt(batch):
            crash_in_child(root, case, batch)
            outcome = attempt(store, case, model, 1)
            assert outcome.resumed_from_batch <= batch
            return outcome
    raise AssertionError(f"unknown interruption {case.interruption!r}")


def crash_in_child(root: Path, case: Case, batch: int) -> None:
    """Run the first attempt in a fresh interpreter whose model exits hard in ``batch``."""
    job = root.parent / "crash-job.pickle"
    job.write_bytes(pickle.dumps((root, case, batch)))
    code = ("import importlib, sys; sys.path[:0] = sys.argv[1:3]; "
            "importlib.import_module(sys.argv[3]).crash_child(sys.argv[4])")
    done = subprocess.run(
        [sys.executable, "-c", code, str(ROOT), str(Path(__file__).parent), __name__,
         str(job)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, f"the child did not crash in batch {batch}:\n{done.stderr}"


def crash_child(job: str) -> None:
    """(In the child.) The first attempt, with a model that exits the process hard."""
    root, case, batch = pickle.loads(Path(job).read_bytes())
    attempt(LocalStore(root), case, Model(case.shape, crash_at=batch), 0)
    print(f"batch {batch} never ran", file=sys.stderr)  # the case never draws one past the last
    sys.exit(3)


@contextmanager
def folder() -> Iterator[Path]:
    """A fresh directory per example (pytest's ``tmp_path`` is one per test)."""
    with tempfile.TemporaryDirectory(prefix="longrun-differential-") as name:
        yield Path(name)


# -- the invariant -----------------------------------------------------------------------


def assert_commits_alike(got: Outcome, want: Outcome) -> None:
    """What a commit writes (output and quarantine, as Parquet) is byte-identical."""
    for what in ("output", "quarantine"):
        a, b = getattr(got, what), getattr(want, what)
        if bytes(parquet.dumps(a)) == bytes(parquet.dumps(b)):
            continue
        pd.testing.assert_frame_equal(a, b, obj=what)  # names the column and the difference
        raise AssertionError(
            f"{what}: equal frames encode to different bytes; Arrow schemas:\n"
            f"{pyarrow.Schema.from_pandas(a)}\n-- oracle --\n{pyarrow.Schema.from_pandas(b)}")


def assert_counts_add_up(outcome: Outcome, case: Case) -> None:
    """The ledger covers every batch once and holds exactly the rows about to commit."""
    if case.shape.one_row_per_input:
        assert outcome.rows_in == len(outcome.output) + outcome.rows_quarantined
    outcome.ledger.verify_commit(where="the case", rows_out=len(outcome.output),
                                 rows_quarantined=len(outcome.quarantine),
                                 one_row_per_input=case.shape.one_row_per_input)


def check(case: Case) -> None:
    event(f"interruption: {type(case.interruption).__name__}")
    with folder() as root:
        oracle = attempt(LocalStore(root / "oracle"), replace(case, interruption=Uninterrupted()),
                         Model(case.shape), 0, oracle=True)
        outcome = interrupted(root / "store", case)
    assert_counts_add_up(oracle, case)
    assert_counts_add_up(outcome, case)
    assert_commits_alike(outcome, oracle)


@pytest.mark.timeout(0 if SLOW else 300)
@_settings(ci_examples=60, slow_examples=2000)
@given(cases(st.sampled_from(["none", "raise", "fail_put", "sigterm"])))
def test_interrupted_attempts_commit_the_bytes_of_the_uninterrupted_run(case: Case) -> None:
    """A resumed run committed other bytes than an uninterrupted one: an all-None ``note``
    in one batch (object) against ``str`` in the rest; ``count`` as int64 in one run and
    float64 in the other; a failed background checkpoint write dropped its batches from
    the resumed output."""
    check(case)


@pytest.mark.timeout(0 if SLOW else 300)
@_settings(ci_examples=4, slow_examples=60)
@given(cases(st.just("crash")))
def test_attempt_after_a_hard_crash_commits_the_bytes_of_the_uninterrupted_run(
    case: Case
) -> None:
    """The same invariant when the first attempt's process dies mid-batch (``os._exit``),
    its background checkpoint write possibly half done."""
    check(case)

