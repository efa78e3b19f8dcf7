"""The batch loop of a model stage: map a function over stable batches, validate each
output, checkpoint every N batches or M seconds, resume, react to SIGTERM and deadlines.

Plain Python (no Dagster): ``stage.py`` wraps it in an asset. Every batch output becomes
an Arrow table typed by the schema as soon as it is validated, and the output is assembled
once from all of them (``assembly``), so a run resumed from checkpoint shards and an
uninterrupted run commit byte-identical output. Every completed batch is entered in the
``Ledger`` (its input rows, rows out, rows quarantined); checkpoints carry it, a resume takes
only a checkpoint whose ledger and shards agree, and the commit checks the output against
it. Rows are numbered within the partition's output, so a failure case names the row users
look up.

Pipelined (the default): batch i is validated and normalised on one worker thread while
the model runs batch i+1, so the device does not wait for pandera and Arrow. A batch is
*completed* once it is validated and added; only completed batches are counted in
``Progress``, shown to hooks and checkpointed. The loop joins the worker (every batch
handed to it completed, in order) before each checkpoint, before hooks run, and when it
stops for any reason, SIGTERM's grace guard included. ``pipelined=False`` checks each
batch on the loop's thread right after the model returns it (same bytes, slower). The
pipelined loop snapshots what the model returned on the loop's thread before calling it
again, so a model function may reuse its buffers (pinned staging memory, arrays).
"""

import copy
import functools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Protocol

import numpy as np
import pandas as pd
import pandera.pandas as pa
import pyarrow

from longrun_dagster.assembly import OutputTypes, frame_of, table_of
from longrun_dagster.assembly import concat as concat_tables
from longrun_dagster.checkpoint import Checkpointer, Restored
from longrun_dagster.errors import Preempted, SegmentEnded, StageOutputError
from longrun_dagster.formats import parquet, tables
from longrun_dagster.ledger import Ledger, Plan
from longrun_dagster.manifest import StoredObject
from longrun_dagster.validation import (
    Report,
    combined,
    empty_frame,
    empty_quarantine,
    no_cases,
    reject_all,
    reject_rows,
    validate,
)

VALID, QUARANTINE, CASES = "valid", "quarantine", "cases"
_log = logging.getLogger("longrun_dagster.stage")


@dataclass
class StageRun:
    """What hooks see: the stage's name, its progress, its log, what it declared."""

    name: str
    progress: "Progress"
    log: Any
    need_vram_bytes: int | None = None
    asset: str = ""
    """The stage's asset key, as "a/b"."""
    still_holds: Callable[[], bool] | None = None
    """Whether this attempt's claim is still the partition's (one read of the store)."""
    generation: int = 0
    """The claim generation this attempt holds (0: none)."""
    stopped_by: BaseException | None = None
    """What ended the loop early (None: it finished), for ``on_end``."""


class StageHook(Protocol):
    """Something called around every batch (the GPU guard, the heartbeat publisher).
    ``on_prepare`` runs before the stage's ``setup`` (the model load, which can hang or
    fill the device too), ``on_start`` after it, before the first batch. ``on_batch`` runs
    on the loop's thread once per completed (validated and added) batch, in order, with
    ``progress`` counting it and nothing else moving: pipelined, batch i's call comes right
    after the model returned batch i+1 (the last batch's after the loop), so a hook runs
    between model calls, never during one. A batch completed as the loop stops (SIGTERM,
    time budget, an error) is checkpointed without an ``on_batch`` call. ``on_batch`` may
    raise to stop the stage; completed batches are checkpointed first. ``on_end`` runs
    however the loop ended (its metadata is used only on success)."""

    def on_prepare(self, run: StageRun) -> None: ...

    def on_start(self, run: StageRun) -> None: ...

    def on_batch(self, run: StageRun) -> None: ...

    def on_end(self, run: StageRun) -> dict[str, Any]: ...


@dataclass
class Progress:
    """Where a partition's work stands (completed batches only: validated and added);
    hooks and the progress log read it."""

    batches_total: int
    rows_total: int
    batches_done: int = 0
    rows_done: int = 0
    resumed_from_batch: int = 0
    started: float = field(default_factory=time.monotonic)
    last_progress: float = field(default_factory=time.monotonic)

    def rate(self) -> float:
        """Rows per second computed by this process (resumed rows do not count)."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        done_here = self.rows_done - self._rows_at_resume
        return done_here / elapsed

    _rows_at_resume: int = 0

    def summary(self, ended: bool = False) -> str:
        """One short line for the runs list: ``45% 1,234/2,740 rows, ETA 3m``."""
        pct = 100.0 * self.rows_done / self.rows_total if self.rows_total else 100.0
        head = f"{pct:.0f}% {self.rows_done:,}/{self.rows_total:,} rows"
        if ended:
            return f"{head}, ended"
        rate = self.rate()
        left = self.rows_total - self.rows_done
        return f"{head}, ETA {_duration(left / rate) if rate > 0 else '?'}"

    def describe(self) -> str:
        rate = self.rate()
        left = self.rows_total - self.rows_done
        eta = f"{left / rate:.0f}s" if rate > 0 else "?"
        pct = 100.0 * self.rows_done / self.rows_total if self.rows_total else 100.0
        return (f"{self.rows_done}/{self.rows_total} rows ({pct:.0f}%), batch "
                f"{self.batches_done}/{self.batches_total}, {rate:.1f} rows/s, ETA {eta}")


def _duration(seconds: float) -> str:
    """``45s``, ``3m``, ``1h05m``."""
    if seconds < 90:
        return f"{seconds:.0f}s"
    minutes = round(seconds / 60)
    return f"{minutes}m" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


@dataclass(frozen=True)
class Cadence:
    """When to checkpoint, log progress, stop for SIGTERM or a deadline."""

    every_batches: int = 10
    every_seconds: float = 300.0
    progress_every_seconds: float = 30.0
    sigterm_grace_seconds: float = 20.0
    time_budget_seconds: float | None = None
    """(Checked with the stage's other options: ``options.StageOptions``.)"""


@dataclass(frozen=True)
class Outcome:
    """A finished partition: valid output, quarantined rows, counts, and where its
    valid rows are: checkpoint shards already written (``shards``) and the tables of the
    batches after them (``tail``), which a commit promotes and writes."""

    output_tables: list[pyarrow.Table]
    types: OutputTypes
    quarantine: pd.DataFrame
    failure_cases: pd.DataFrame
    rows_in: int
    batches: int
    checkpoints: int
    resumed_from_batch: int
    wall_seconds: float
    model_calls: int
    hook_metadata: dict[str, Any]
    ledger: Ledger
    """Every batch's input rows, rows out and rows quarantined; the commit checks the
    output and quarantine against it."""
    counts: dict[str, float] = field(default_factory=dict)
    """What fn counted (``stage.count``), over every batch of the partition once."""
    shards: list[tuple[StoredObject, tuple[int, int]]] = field(default_factory=list)
    """The valid-row shards of the last checkpoint that landed, each with its batches."""
    tail: list[pyarrow.Table] = field(default_factory=list)
    """The valid rows of the batches after the shards, one table each."""
    checkpoint_rest: Callable[[], None] = lambda: None
    """Checkpoint the batches after the last checkpoint, for a partition that is not
    committed after all (over its budget, a failed commit): a rerun resumes from them."""

    @property
    def rows_quarantined(self) -> int:
        return len(self.quarantine)

    @property
    def dtypes(self) -> dict[str, str]:
        """The declared pandas dtypes of the output's columns, by name (for readers)."""
        return tables.dtype_names(self.types.pandas)

    @functools.cached_property
    def output(self) -> pd.DataFrame:
        """The valid output as one frame (built on first use: a stage's commit promotes
        the shards and never needs it)."""
        return self.types.frame(self.output_tables)


@dataclass(frozen=True)
class Answered:
    """What a batch function may return instead of a frame: its output rows, and the input
    rows it has no output for, each with its reason (an API answer that was not an
    answer), which are quarantined after the output's own and count against the budget."""

    output: pd.DataFrame
    rejected: pd.DataFrame
    reasons: list[dict[str, str]]
    """Per rejected row: ``{"column", "check", "value"}`` (check: the reason)."""
    positions: list[int] | None = None
    """Each rejected row's place in the batch (one row per input): rows are then numbered
    as the inputs, the output's rows filling the places between."""

    def __len__(self) -> int:
        return len(self.output) + len(self.rejected)


BatchFn = Callable[[pd.DataFrame, int], "pd.DataFrame | Answered"]


class BatchLoop:
    """One attempt at one partition: resume, map ``fn`` over batches, checkpoint, finish."""

    def __init__(self, fn: BatchFn, frame: pd.DataFrame, *, batch_size: int,
                 schema: pa.DataFrameSchema, checkpointer: Checkpointer, cadence: Cadence,
                 hooks: Sequence[StageHook] = (), name: str = "stage",
                 one_row_per_input: bool = True, need_vram_bytes: int | None = None,
                 asset: str = "", setup: Callable[[], None] | None = None,
                 log: logging.Logger | logging.LoggerAdapter[Any] | None = None,
                 pipelined: bool = True, still_holds: Callable[[], bool] | None = None,
                 generation: int = 0,
                 counts: Callable[[], dict[str, float]] | None = None,
                 final_save: bool = True, abort: Callable[[], None] | None = None) -> None:
        self.fn, self.frame, self.batch_size = fn, frame, batch_size
        self.counts = counts  # what fn counted in the batch it just ran (stage.count)
        self.final_save = final_save  # False: the commit writes the last batches instead
        self.abort = abort  # at each batch boundary: raises to stop (a failed commit)
        self._restored_shards = 0  # tables of each kind that are restored shards
        self.schema, self.ckpt, self.cadence = schema, checkpointer, cadence
        self.hooks, self.name, self.log = list(hooks), name, log or _log
        self.one_row_per_input = one_row_per_input
        self.setup = setup
        self.types = OutputTypes(schema)
        self.ledger = Ledger(Plan(len(frame), batch_size))
        total = self.ledger.plan.batches
        self.progress = Progress(batches_total=total, rows_total=len(self.frame))
        self.run_info = StageRun(name, self.progress, self.log, need_vram_bytes, asset,
                                 still_holds, generation)
        self._frames: dict[str, list[pyarrow.Table]] = {VALID: [], QUARANTINE: [], CASES: []}
        self._pending = 0  # batches done since the last checkpoint
        self._rows_out = 0  # output rows (valid and quarantined) of the batches done
        self._saved_at = time.monotonic()
        self._lock = threading.RLock()  # the loop and the SIGTERM guard both save
        self._stop = threading.Event()
        self._done = threading.Event()  # the loop has ended, cleanly or by raising
        self.model_calls = 0
        self.pipelined = pipelined
        self._worker: ThreadPoolExecutor | None = None
        self._checking: Future[None] | None = None  # the batch on the worker, if any
        self._announced = 0  # batches_done when hooks last ran
        self._segment_first = 0  # batches_done when this run (segment) began its loop
        self._logged = 0.0

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> Outcome:
        started = time.monotonic()
        self._resume()
        if self.pipelined:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="longrun-validate")
        with _on_sigterm(self._sigterm):
            try:
                self._start()
                self._loop()
            except BaseException as exc:
                self.run_info.stopped_by = exc
                self._save_completed("interrupted")  # lose no completed batch
                raise
            finally:
                self._done.set()
                if self._worker is not None:
                    self._worker.shutdown(wait=True)
                meta = self._end()
        valid = self._frames[VALID] or [self.types.table(empty_frame(self.schema))]
        shards = self.ckpt.shards(VALID)
        after = self._restored_shards + self.ckpt.step - self.progress.resumed_from_batch
        return Outcome(
            output_tables=valid, types=self.types,
            quarantine=frame_of(self._frames[QUARANTINE]),
            failure_cases=frame_of(self._frames[CASES]), rows_in=len(self.frame),
            batches=self.progress.batches_total, checkpoints=self.ckpt.saves,
            resumed_from_batch=self.progress.resumed_from_batch,
            wall_seconds=time.monotonic() - started, model_calls=self.model_calls,
            hook_metadata=meta, ledger=self.ledger, counts=self.ledger.counts,
            shards=shards, tail=self._frames[VALID][after:] if self._frames[VALID] else valid,
            checkpoint_rest=lambda: self._save_completed("not committed"),
        )

    def _start(self) -> None:
        for hook in self.hooks:
            hook.on_prepare(self.run_info)
        if self.setup is not None and self.progress.batches_done < \
                self.progress.batches_total:  # a finished checkpoint needs no model
            self.setup()
        for hook in self.hooks:
            hook.on_start(self.run_info)

    def _end(self) -> dict[str, Any]:
        """Wait for the last checkpoint write and end every hook, whatever failed: a hook
        may run a thread (the watchdog) that outlives the stage and kills it unless ended.
        A failed write is only logged: the checkpoint serves resume, the output is whole."""
        try:
            self.ckpt.close()
        except Exception as exc:  # noqa: BLE001 - the loop's outcome or error matters more
            self.log.error(f"{self.name}: the last checkpoint write failed: {exc}; a rerun "
                           "resumes from an earlier checkpoint")
        meta: dict[str, Any] = {}
        for hook in self.hooks:
            try:
                meta.update(hook.on_end(self.run_info))
            except Exception as exc:  # noqa: BLE001 - the other hooks must end too
                self.log.error(f"{self.name}: hook {type(hook).__qualname__}.on_end "
                               f"failed: {exc}")
        return meta

    def _loop(self) -> None:
        self._announced = self.progress.batches_done
        self._logged = time.monotonic()
        per_batch = 0.0
        self._segment_first = self.progress.batches_done
        for index in range(self.progress.batches_done, self.progress.batches_total):
            self._check_stop(index, per_batch)
            began = time.monotonic()
            batch, out = self._call_model(index)
            counted = self.counts() if self.counts is not None else {}
            self._join()  # pipelined: batch index-1, checked while the model ran this one
            self._announce()
            if self._worker is None:
                self._complete(index, batch, out, counted)
                self._announce()
            else:
                self._checking = self._worker.submit(self._complete, index, batch,
                                                     _snapshotted(out), counted)
            per_batch = max(per_batch, time.monotonic() - began)
        self._join()
        self._announce()
        if self.final_save:
            self._save_completed("finished")

    def _call_model(self, index: int) -> tuple[pd.DataFrame, "pd.DataFrame | Answered"]:
        start = index * self.batch_size
        batch = self.frame.iloc[start:start + self.batch_size]
        self.model_calls += 1
        out = self.fn(batch, index)
        if not isinstance(out, pd.DataFrame | Answered):
            raise StageOutputError(
                f"{self.name}: the model function returned {type(out).__qualname__} for "
                f"batch {index}; it must return a pandas DataFrame of output rows"
            )
        return batch, out

    def _announce(self) -> None:
        """Hooks, a checkpoint when one is due, the progress log: once per batch completed
        since the last call (with the worker idle, so progress holds still)."""
        while self._announced < self.progress.batches_done:
            self._announced += 1
            for hook in self.hooks:
                hook.on_batch(self.run_info)
            if self._pending >= self.cadence.every_batches or \
                    time.monotonic() - self._saved_at >= self.cadence.every_seconds:
                self._save()
        if time.monotonic() - self._logged >= self.cadence.progress_every_seconds:
            self.log.info(f"{self.name}: {self.progress.describe()}")
            self._logged = time.monotonic()

    def _complete(self, index: int, batch: pd.DataFrame, out: "pd.DataFrame | Answered",
                  counted: dict[str, float] | None = None) -> None:
        """Validate and normalise batch ``index``'s output and add it: on the worker thread
        when pipelined (batches strictly in order, since row numbers count the output rows
        of the batches before), else on the loop's thread."""
        try:
            if self.one_row_per_input and len(out) != len(batch):
                report = reject_all(batch, self.schema, "<rows>",
                                    "one output row per input row",
                                    f"{len(out)} rows returned for {len(batch)} inputs",
                                    first_row=self._rows_out)
            elif isinstance(out, Answered):
                report = self._answered(out)
            else:
                report = validate(out, self.schema, first_row=self._rows_out)
            labels = out.output.index if isinstance(out, Answered) else out.index
            frames = self._added(index, report, labels)
            digest = tables.digest(frames[VALID])
        except Exception as exc:
            exc.add_note(f"{self.name}: raised while validating the output of batch {index}")
            raise
        with self._lock:
            for kind, frame in frames.items():
                self._frames[kind].append(frame)
            self.ledger.add(index, len(report.valid), report.rows_invalid, counted, digest)
            self._rows_out += report.rows_checked
            self.progress.batches_done = index + 1
            self.progress.rows_done = min((index + 1) * self.batch_size, len(self.frame))
            self.progress.last_progress = time.monotonic()
            self._pending += 1

    def _answered(self, out: Answered) -> Report:
        """An ``Answered`` batch's report: its rejected rows numbered where they stand among
        the batch's inputs when ``positions`` says, else after the output's rows."""
        first = self._rows_out
        if out.positions is None or not self.one_row_per_input:
            return combined(validate(out.output, self.schema, first_row=first),
                            reject_rows(out.rejected, out.reasons,
                                        first_row=first + len(out.output)))
        rejected = set(out.positions)
        places = [p for p in range(len(out)) if p not in rejected]
        return combined(
            validate(out.output, self.schema, rows=pd.Index([first + p for p in places])),
            reject_rows(out.rejected, out.reasons,
                        numbers=pd.Index([first + p for p in out.positions])))

    def _added(self, index: int, report: Report, labels: pd.Index) -> dict[str, pyarrow.Table]:
        """Batch ``index``'s tables as the loop keeps (and checkpoints) them; the valid rows
        keep the labels of the model's output index where ``_kept_index`` says so."""
        valid = report.valid
        if _kept_index(labels) and report.valid_rows is not None:
            valid = valid.set_axis(labels[report.valid_rows - (self._rows_out)], axis="index")
        if report.clean:
            quarantine, cases = _no_failures()
        else:
            quarantine, cases = _quarantine(index, report), _cases(index, report)
        return {VALID: self.types.table(valid), QUARANTINE: quarantine, CASES: cases}

    def _join(self) -> None:
        """Wait until every batch handed to the worker is completed; raise its error."""
        checking = self._checking
        if checking is None:
            return
        wait_for([checking])  # interrupted (Ctrl-C), it stays for the except path to wait
        self._checking = None
        checking.result()

    # -- checkpoints -------------------------------------------------------------------

    def _resume(self) -> None:
        restored = self.ckpt.restore(accept=self._resumable)
        if restored is None:
            return
        done = int(restored.step)
        self.ledger = Ledger.from_json(self.ledger.plan, restored.metadata["ledger"])
        for kind, data in restored.shards:
            self._frames[kind].append(parquet.loads_table(data))
        self._restored_shards = len(self._frames[VALID])
        self._rows_out = self.ledger.rows_out + self.ledger.rows_quarantined
        self.progress.batches_done = self.progress.resumed_from_batch = done
        self.progress.rows_done = min(done * self.batch_size, len(self.frame))
        self.progress._rows_at_resume = self.progress.rows_done
        self.log.info(f"{self.name}: resuming from checkpoint after batch {done} "
                      f"({self.progress.rows_done}/{self.progress.rows_total} rows done)")

    def _resumable(self, restored: Restored) -> str | None:
        """Why a checkpoint cannot be resumed from (None: it can): another input, or a
        ledger that does not cover batches 0..k-1 exactly once, or shards that do not hold
        exactly the ledger's rows of the batches they say they hold."""
        done, meta = restored.step, restored.metadata
        if done > self.progress.batches_total or meta.get("rows_total") != len(self.frame):
            return f"it does not match this input (taken at batch {done} of another)"
        try:
            ledger = Ledger.from_json(self.ledger.plan, meta.get("ledger"))
        except ValueError as exc:
            return str(exc)
        wrong = ledger.problems(upto=done, one_row_per_input=self.one_row_per_input)
        if done and ledger.digests is None:
            wrong.append("its ledger has no content digests (written before "
                         "longrun-dagster 0.3); the partition starts over")
        for kind in (VALID, QUARANTINE):
            spans = [span for (k, _), span in zip(restored.shards, restored.spans, strict=True)
                     if k == kind]
            if [first for first, _ in spans] != [0] + [stop for _, stop in spans[:-1]] or \
                    (spans[-1][1] if spans else 0) != done:
                wrong.append(f"its {kind} shards hold batches {spans}, not 0..{done - 1}")
        for (kind, data), (first, stop) in zip(restored.shards, restored.spans, strict=True):
            if kind in (VALID, QUARANTINE):
                want = ledger.span(first, stop)[0 if kind == VALID else 1]
                if parquet.rows(data) != want:
                    wrong.append(f"its {kind} shard of batches {first}..{stop - 1} holds "
                                 f"{parquet.rows(data)} rows, its ledger {want}")
        return "; ".join(wrong) or None

    def _save(self, *, wait: bool = False) -> None:
        with self._lock:
            if self._pending == 0:
                return
            fresh = {kind: frames[len(frames) - self._pending:]
                     for kind, frames in self._frames.items()}
            shards = [(kind, _encoder(frames), sum(t.num_rows for t in frames))
                      for kind, frames in fresh.items()]
            self.ckpt.save(self.progress.batches_done, new_shards=shards,
                           metadata={"rows_total": len(self.frame),
                                     "ledger": self.ledger.as_json()})
            self._pending = 0
            self._saved_at = time.monotonic()
        if wait:
            self.ckpt.flush()

    def _save_completed(self, why: str) -> None:
        """Checkpoint every completed batch, waiting for the one on the worker; a failed
        batch there (its error was or will be raised by the loop) stops nothing here."""
        try:
            self._join()
        except Exception as exc:  # noqa: BLE001 - the original error matters more
            self.log.error(f"{self.name}: {exc} ({why})")
        try:
            self._save(wait=True)
        except Exception as exc:  # noqa: BLE001 - the original error matters more
            self.log.error(f"{self.name}: could not checkpoint ({why}): {exc}")

    # -- stopping early ----------------------------------------------------------------

    def _check_stop(self, index: int, per_batch: float) -> None:
        if self.abort is not None:
            self.abort()
        if self._stop.is_set():
            self._join()
            self._save(wait=True)
            raise Preempted(
                f"{self.name}: stopped by SIGTERM after batch {index}; checkpoint written, "
                "the next attempt resumes there"
            )
        budget = self.cadence.time_budget_seconds
        if budget is None:
            return
        elapsed = time.monotonic() - self.progress.started
        # Every segment completes a batch at least: one that ended before its first (a
        # slow model load on a loaded machine) would hand its continuation the same fate.
        if index > self._segment_first and elapsed + 2 * per_batch + 1.0 >= budget:
            self._join()
            self._save(wait=True)
            raise SegmentEnded(
                f"{self.name}: time budget of {budget:.0f}s nearly spent after "
                f"{self.progress.describe()}; checkpoint written at batch {index}. Run the "
                "partition again (the continuation) to resume there",
                batches_done=index, batches_total=self.progress.batches_total,
            )

    def _sigterm(self) -> None:
        """Signal handler: ask the loop to stop; if the batch in flight outlasts the grace
        period, save what is complete from a guard thread and exit hard."""
        self._stop.set()
        self.log.warning(f"{self.name}: SIGTERM; checkpointing within "
                         f"{self.cadence.sigterm_grace_seconds:.0f}s")
        threading.Thread(target=self._grace_guard, daemon=True).start()

    def _grace_guard(self) -> None:
        grace = self.cadence.sigterm_grace_seconds
        if self._done.wait(grace * 0.5):
            return  # the loop stopped at a batch boundary and checkpointed
        checking = self._checking  # left for the loop to raise: only wait for it here
        if checking is not None:
            wait_for([checking], timeout=grace * 0.25)
        try:
            self._save(wait=True)
        except Exception as exc:  # noqa: BLE001 - exiting anyway
            self.log.error(f"{self.name}: could not checkpoint (SIGTERM grace period): {exc}")
        os._exit(143)


def _kept_index(labels: pd.Index) -> bool:
    """Whether the output keeps ``fn``'s index: a named one, or one whose labels are not
    integers (document ids). An unnamed integer index (a ``RangeIndex``, or the positions
    a filter such as ``batch[mask]`` keeps of a default index) becomes a plain 0..n-1,
    decided by the index's type and name, never by its values (pandas turns an evenly
    spaced selection of a ``RangeIndex`` into a ``RangeIndex``)."""
    return any(name is not None for name in labels.names) or \
        not pd.api.types.is_integer_dtype(labels.dtype)


_QUARANTINE_TYPES = {"batch": pyarrow.int64(), "position": pyarrow.int64(),
                     "row": pyarrow.large_string(), "failures": pyarrow.large_string()}
_CASES_TYPES = {"column": pyarrow.large_string(), "check": pyarrow.large_string(),
                "failure_case": pyarrow.large_string(), "index": pyarrow.float64(),
                "batch": pyarrow.int64()}


def _quarantine(index: int, report: Report) -> pyarrow.Table:
    quarantine = report.quarantined.reset_index()
    quarantine.insert(0, "batch", index)
    return table_of(quarantine, _QUARANTINE_TYPES)


def _cases(index: int, report: Report) -> pyarrow.Table:
    cases = report.failure_cases.assign(batch=index)
    cases["index"] = pd.to_numeric(cases["index"], errors="coerce").astype("float64")
    return table_of(cases, _CASES_TYPES)


@functools.cache
def _no_failures() -> tuple[pyarrow.Table, pyarrow.Table]:
    """The quarantine and failure-case tables of a batch without failures, built once
    (~3 ms a batch otherwise): they have no rows, so the batch number is in none and every
    batch's are the same. Arrow tables are immutable, so sharing them is safe."""
    clean = Report(pd.DataFrame(), empty_quarantine(), no_cases())
    return _quarantine(0, clean), _cases(0, clean)


def _encoder(tables: list[pyarrow.Table]) -> Callable[[], memoryview]:
    """Encode later, in the checkpoint writer thread (Arrow tables are immutable)."""
    return lambda: parquet.dumps_table(concat_tables(tables))


def _snapshotted(out: "pd.DataFrame | Answered") -> "pd.DataFrame | Answered":
    if isinstance(out, Answered):
        return Answered(_snapshot(out.output), out.rejected, out.reasons, out.positions)
    return _snapshot(out)


_IMMUTABLE = (str, bytes, int, float, bool, type(None), complex)


def _snapshot(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of what the model returned that shares no mutable memory with it: numeric
    buffers copied, and object cells that are not immutable (lists, arrays, dicts) deep
    copied, so the model may reuse its buffers for the next batch while this one is
    validated."""
    copied = frame.copy(deep=True)
    for position, dtype in enumerate(copied.dtypes):
        if dtype == np.dtype(object):
            cells = copied.iloc[:, position].to_numpy()
            if not all(type(v) in _IMMUTABLE for v in cells) and not _unshared_rows(cells):
                copied.isetitem(position, _owned_cells(cells))
    return copied


_ROW_REFS = 4
"""References to a row view that only the two frames hold: the model's frame's object
array, the copy's, and (while it is counted) the loop's variable and the call's argument."""


def _unshared_rows(cells: np.ndarray) -> bool:
    """True when the cells are views of one array that owns its memory and nothing else
    references (not the model, not another view), and nothing but the two frames
    references each view: then nothing can write to them any more and they need no copy.
    The common case, ``list(model(batch).numpy())``, costs a pass over the cells instead
    of a copy of the matrix; any other holder shows in a reference count and copies."""
    base = getattr(cells[0], "base", None) if len(cells) else None
    if type(base) is not np.ndarray or not base.flags.owndata:
        return False
    for cell in cells:
        if type(cell) is not np.ndarray or cell.base is not base or \
                sys.getrefcount(cell) > _ROW_REFS:
            return False
    return sys.getrefcount(base) == len(cells) + 2  # each view's, and this call's two


def _owned_cells(cells: np.ndarray) -> np.ndarray:
    """Object cells that share no mutable memory with ``cells``: rows of one embedding
    matrix (ndarrays of one shape and dtype) are stacked into one new buffer in one copy,
    anything else is deep copied cell by cell."""
    owned = np.empty(len(cells), dtype=object)
    first = cells[0] if len(cells) else None
    if type(first) is np.ndarray and first.ndim and first.dtype != object and all(
            type(v) is np.ndarray and v.shape == first.shape and v.dtype == first.dtype
            for v in cells):
        matrix = np.concatenate(list(cells)).reshape(len(cells), *first.shape)
        owned[:] = list(matrix)
    else:
        owned[:] = [v if type(v) in _IMMUTABLE else copy.deepcopy(v) for v in cells]
    return owned


class _on_sigterm:
    """Route SIGTERM to ``callback`` while inside (main thread only; elsewhere a no-op)."""

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback
        self.previous: Any = None
        self.installed = False

    def __enter__(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
            self.installed = True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.callback()

    def __exit__(self, *exc: object) -> None:
        if self.installed:
            signal.signal(signal.SIGTERM, self.previous)
