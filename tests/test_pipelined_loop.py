"""The pipelined batch loop (batch i validated on a worker thread while the model runs
batch i+1): the same bytes as the sequential loop, and every way of stopping (SIGTERM,
the time budget, a model error, kill -9) checkpoints exactly the validated batches and
resumes to byte-identical output.

Run as a script (``python -m tests.test_pipelined_loop <dir> <every> <slow_from>
<sleep> <grace>``) it is the process the SIGTERM and kill -9 tests stop: it prints
``DONE <i>`` when the model has returned batch i, exits 3 on ``Preempted``, 0 when done.
"""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import pandera.pandas as pa
import pyarrow
import pytest

from longrun_dagster.batches import (
    BatchFn,
    BatchLoop,
    Cadence,
    Outcome,
    StageHook,
    StageRun,
    _cases,
    _no_failures,
    _quarantine,
)
from longrun_dagster.checkpoint import Checkpointer
from longrun_dagster.errors import Preempted, SegmentEnded
from longrun_dagster.storage import LocalStore
from longrun_dagster.validation import Report, empty_quarantine, failure_sample, no_cases
from tests.test_batch_loop import BATCH, PREFIX, SCHEMA, inputs, model, same_bytes

ROOT = Path(__file__).parent.parent
PREEMPTED = 3


def loop(store_dir: Path, fn: BatchFn, frame: pd.DataFrame, *, pipelined: bool = True,
         every: int = 2, hooks: Sequence[StageHook] = (), one_row_per_input: bool = True,
         schema: pa.DataFrameSchema = SCHEMA, **cadence: Any) -> BatchLoop:
    ckpt = Checkpointer(LocalStore(store_dir), PREFIX, background=True)
    return BatchLoop(fn, frame, batch_size=BATCH, schema=schema, checkpointer=ckpt,
                     cadence=Cadence(every_batches=every, every_seconds=3600, **cadence),
                     hooks=hooks, one_row_per_input=one_row_per_input, pipelined=pipelined)


def same_outcome(a: Outcome, b: Outcome) -> None:
    assert same_bytes(a.output, b.output)
    assert same_bytes(a.quarantine, b.quarantine)
    assert same_bytes(a.failure_cases, b.failure_cases)


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    """An uninterrupted sequential run of 20 clean batches: the bytes to match."""
    return loop(tmp_path_factory.mktemp("clean"), model(), inputs(200), pipelined=False).run()


# -- the same bytes as the sequential loop ---------------------------------------------


DAMAGE = {1: "short", 3: "wrong_dtype", 4: "extra_column", 5: "missing_column"}


@pytest.mark.parametrize("one_row_per_input", [True, False])
@pytest.mark.parametrize("every", [1, 3, 100])
def test_pipelined_output_quarantine_and_cases_are_the_sequential_bytes(
    tmp_path: Path, every: int, one_row_per_input: bool
) -> None:
    """Validating on a worker must change no byte of the output, the quarantine or the
    failure cases: bad rows, wrong-length batches and frame-wide failures (wrong dtype,
    extra and missing columns) among clean batches, with row numbers that count earlier
    batches' output rows (computed in order on the worker)."""
    make = partial(model, DAMAGE, bad_row=(6, 4))
    outcomes = [loop(tmp_path / str(p), make(), inputs(100), pipelined=p, every=every,
                     one_row_per_input=one_row_per_input).run() for p in (False, True)]
    same_outcome(*outcomes)
    pipelined = outcomes[1]
    assert pipelined.rows_quarantined == (41 if one_row_per_input else 31)
    bad_row = 64 if one_row_per_input else 10 + 7 + 40 + 4  # batch 1 returned 7 rows
    assert bad_row in {c["row"] for c in failure_sample(pipelined.failure_cases, 100)}


def test_quarantine_under_the_pipelined_loop(tmp_path: Path) -> None:
    """A bad row in batch 3 at position 4 is quarantined as partition row 34 of batch 3,
    the rest of the partition is valid, when batch 3 was checked on the worker."""
    outcome = loop(tmp_path, model(bad_row=(3, 4)), inputs()).run()
    assert list(outcome.quarantine.position) == [34]
    assert list(outcome.quarantine.batch) == [3]
    assert [c["row"] for c in failure_sample(outcome.failure_cases)] == [34]
    assert len(outcome.output) == 59 and 34 not in set(outcome.output.n)


def test_cached_empty_tables_are_the_tables_built_per_batch() -> None:
    """A clean batch reuses one empty quarantine and failure-case table; they must equal
    (types, metadata) the ones each batch built."""
    clean = Report(pd.DataFrame(), empty_quarantine(), no_cases())
    quarantine, cases = _no_failures()
    assert quarantine.equals(_quarantine(7, clean), check_metadata=True)
    assert cases.equals(_cases(7, clean), check_metadata=True)


# -- what hooks see --------------------------------------------------------------------


class Seen:
    """A hook that records progress at each ``on_batch``; raises after batch ``stop``."""

    def __init__(self, stop: int | None = None) -> None:
        self.seen: list[tuple[int, int]] = []
        self.stop = stop

    def on_prepare(self, run: StageRun) -> None: ...

    def on_start(self, run: StageRun) -> None: ...

    def on_batch(self, run: StageRun) -> None:
        self.seen.append((run.progress.batches_done, run.progress.rows_done))
        if self.stop is not None and run.progress.batches_done == self.stop + 1:
            raise RuntimeError(f"hook stops after batch {self.stop}")

    def on_end(self, run: StageRun) -> dict[str, Any]:
        return {}


def test_hooks_see_each_validated_batch_once_in_order(tmp_path: Path) -> None:
    """Hooks must see progress count validated batches only: once per batch, in order,
    the last one included (its validation ends after the last model call)."""
    hook = Seen()
    loop(tmp_path, model(), inputs(55), hooks=[hook]).run()
    assert hook.seen == [(i, min(i * BATCH, 55)) for i in range(1, 7)]


def test_hook_stop_checkpoints_the_validated_batches(tmp_path: Path, clean: Outcome) -> None:
    """A hook raising after batch 2 stops the stage: batches 0-2 are checkpointed (the
    model's batch 3, not yet validated, is redone) and the resume matches byte for byte."""
    with pytest.raises(RuntimeError, match="hook stops after batch 2"):
        loop(tmp_path, model(), inputs(200), every=100, hooks=[Seen(stop=2)]).run()
    again = loop(tmp_path, model(), inputs(200)).run()
    assert again.resumed_from_batch == 3
    same_outcome(again, clean)


# -- stopping and resuming -------------------------------------------------------------


@pytest.mark.parametrize("every", [3, 100])
def test_model_error_checkpoints_every_batch_before_it(
    tmp_path: Path, clean: Outcome, every: int
) -> None:
    """A model error in batch 7 must checkpoint batches 0-6, batch 6 included though it
    was still on the worker when the model raised; the resume is byte-identical."""
    with pytest.raises(RuntimeError, match="injected failure in batch 7"):
        loop(tmp_path, model(raise_at=7), inputs(200), every=every).run()
    again = loop(tmp_path, model(), inputs(200), every=every).run()
    assert again.resumed_from_batch == 7 and again.model_calls == 13
    same_outcome(again, clean)


def test_time_budget_checkpoints_the_validated_batches(tmp_path: Path, clean: Outcome) -> None:
    """The time budget ends a segment with the worker joined: the checkpoint holds every
    batch it reports done, and the continuation resumes there to the same bytes."""
    inner = model()

    def slow(batch: pd.DataFrame, index: int) -> pd.DataFrame:
        time.sleep(0.1)
        return inner(batch, index)

    with pytest.raises(SegmentEnded) as ended:
        loop(tmp_path, slow, inputs(200), every=100, time_budget_seconds=1.6).run()
    assert 0 < ended.value.batches_done < 20
    again = loop(tmp_path, model(), inputs(200)).run()
    assert again.resumed_from_batch == ended.value.batches_done
    same_outcome(again, clean)


def test_every_segment_completes_a_batch_however_slow_its_start(tmp_path: Path,
                                                                 clean: Outcome) -> None:
    """A time box shorter than the start of a run (a model load on a loaded machine) ended
    every segment before its first batch, so the continuations never finished (seen as
    >12 segments in CI). Each segment now completes at least one batch."""
    inner = model()
    segments = 0
    while True:
        segments += 1
        assert segments <= 20, "each segment must complete a batch"
        ckpt = Checkpointer(LocalStore(tmp_path), PREFIX, background=True)
        boxed = BatchLoop(inner, inputs(200), batch_size=BATCH, schema=SCHEMA,
                          checkpointer=ckpt, setup=lambda: time.sleep(0.3),
                          cadence=Cadence(every_batches=100, every_seconds=3600,
                                          time_budget_seconds=0.2))
        try:
            outcome = boxed.run()
            break
        except SegmentEnded as ended:
            assert ended.batches_done >= segments
    same_outcome(outcome, clean)


@pytest.mark.parametrize("pipelined", [True, False])
def test_validation_error_on_the_worker_surfaces_with_its_batch(
    tmp_path: Path, pipelined: bool
) -> None:
    """An error raised while validating or normalising a batch (here Arrow refusing a
    column of ints and strings) must reach the loop's caller naming the batch, not die
    with the worker; the batches before it are checkpointed."""
    schema = SCHEMA.add_columns({"blob": pa.Column(object)})
    inner = model()

    def fn(batch: pd.DataFrame, index: int) -> pd.DataFrame:
        out = inner(batch, index)
        out["blob"] = ["x"] * len(out) if index != 3 else [1] + ["x"] * (len(out) - 1)
        return out

    with pytest.raises(pyarrow.ArrowException) as raised:
        loop(tmp_path, fn, inputs(), pipelined=pipelined, every=100, schema=schema).run()
    assert "output of batch 3" in "\n".join(getattr(raised.value, "__notes__", []))
    restored = Checkpointer(LocalStore(tmp_path), PREFIX).restore()
    assert restored is not None and restored.step == 3


# -- a real process, stopped by SIGTERM or kill -9 -------------------------------------


class LoopProcess:
    """This module run as a script: a pipelined loop over 20 batches in its own process."""

    def __init__(self, store_dir: Path, *, every: int, slow_from: int = 0,
                 sleep: float = 0.05, grace: float = 20.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.test_pipelined_loop", str(store_dir), str(every),
             str(slow_from), str(sleep), str(grace)], cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []

    def wait_for(self, line: str) -> None:
        assert self.proc.stdout is not None
        for got in self.proc.stdout:
            self.lines.append(got)
            if got == line + "\n":
                return
        raise AssertionError(f"loop ended before {line!r}:\n" + "".join(self.lines))

    def finish(self, timeout: float = 120) -> int:
        out, _ = self.proc.communicate(timeout=timeout)
        self.lines += out.splitlines(keepends=True)
        return self.proc.returncode

    @property
    def done(self) -> int:
        """Batches the model returned (each then validated, or on the worker)."""
        return sum(line.startswith("DONE ") for line in self.lines)


def resume(store_dir: Path) -> Outcome:
    return loop(store_dir, model(), inputs(200)).run()


def test_sigterm_at_a_batch_boundary_checkpoints_every_model_batch(
    tmp_path: Path, clean: Outcome
) -> None:
    """SIGTERM mid-batch stops at the next boundary with the worker joined: every batch
    the model returned is validated and checkpointed, and the resume matches."""
    proc = LoopProcess(tmp_path, every=100)
    proc.wait_for("START 3")
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.finish() == PREEMPTED, "".join(proc.lines)
    again = resume(tmp_path)
    assert again.resumed_from_batch == proc.done >= 4
    same_outcome(again, clean)


def test_sigterm_grace_guard_checkpoints_the_batch_on_the_worker(
    tmp_path: Path, clean: Outcome
) -> None:
    """SIGTERM during a batch that outlasts the grace period: the guard thread checkpoints
    what is complete, batch 2 included (handed to the worker just before batch 3 began;
    the guard waits for it), then exits 143; the resume matches byte for byte."""
    proc = LoopProcess(tmp_path, every=100, slow_from=3, sleep=30, grace=2)
    proc.wait_for("START 3")
    sent = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.finish() == 143, "".join(proc.lines)
    assert time.monotonic() - sent < 15
    again = resume(tmp_path)
    assert again.resumed_from_batch == 3
    same_outcome(again, clean)


def test_kill_9_mid_run_resumes_to_the_same_bytes(tmp_path: Path, clean: Outcome) -> None:
    """kill -9 while batches are on the worker and checkpoints in flight: the resume
    starts from the last whole checkpoint and commits the uninterrupted bytes."""
    proc = LoopProcess(tmp_path, every=2)
    proc.wait_for("DONE 8")
    proc.proc.send_signal(signal.SIGKILL)
    assert proc.finish() == -signal.SIGKILL
    again = resume(tmp_path)
    assert 0 < again.resumed_from_batch <= proc.done
    same_outcome(again, clean)


def main(store_dir: str, every: int, slow_from: int, sleep: float, grace: float) -> int:
    inner = model()

    def fn(batch: pd.DataFrame, index: int) -> pd.DataFrame:
        print(f"START {index}", flush=True)
        if index >= slow_from:
            time.sleep(sleep)
        out = inner(batch, index)
        print(f"DONE {index}", flush=True)
        return out

    try:
        loop(Path(store_dir), fn, inputs(200), every=every,
             sigterm_grace_seconds=grace).run()
    except Preempted:
        return PREEMPTED
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]),
                  float(sys.argv[5])))
