"""The batch loop of a model stage: map a function over stable batches, validate each
output, checkpoint every N batches or M seconds, resume, react to SIGTERM and deadlines.

Plain Python (no Dagster): ``stage.py`` wraps it in an asset. Every batch output is
normalised through a Parquet round trip as soon as it is produced, so a run resumed from
checkpoint shards and an uninterrupted run concatenate identical frames and commit
byte-identical output. Rows are numbered within the partition's output, so a failure case
names the row users look up.

Pipelined (the default): batch i is validated and normalised on one worker thread while
the model runs batch i+1, so the device does not wait for pandera and Arrow. A batch is
*completed* once it is validated and added; only completed batches are counted in
``Progress``, shown to hooks and checkpointed. The loop joins the worker (every batch
handed to it completed, in order) before each checkpoint, before hooks run, and when it
stops for any reason, SIGTERM's grace guard included. ``pipelined=False`` checks each
batch on the loop's thread right after the model returns it (same bytes, slower).
"""

import functools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Protocol

import pandas as pd
import pandera.pandas as pa

from longrun_dagster.checkpoint import Checkpointer
from longrun_dagster.errors import ConfigError, Preempted, SegmentEnded
from longrun_dagster.formats import parquet
from longrun_dagster.validation import (
    Report,
    empty_frame,
    empty_quarantine,
    no_cases,
    reject_all,
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
    """A finished partition: valid output, quarantined rows, counts."""

    output: pd.DataFrame
    quarantine: pd.DataFrame
    failure_cases: pd.DataFrame
    rows_in: int
    batches: int
    checkpoints: int
    resumed_from_batch: int
    wall_seconds: float
    model_calls: int
    hook_metadata: dict[str, Any]

    @property
    def rows_quarantined(self) -> int:
        return len(self.quarantine)


BatchFn = Callable[[pd.DataFrame, int], pd.DataFrame]


class BatchLoop:
    """One attempt at one partition: resume, map ``fn`` over batches, checkpoint, finish."""

    def __init__(self, fn: BatchFn, frame: pd.DataFrame, *, batch_size: int,
                 schema: pa.DataFrameSchema, checkpointer: Checkpointer, cadence: Cadence,
                 hooks: Sequence[StageHook] = (), name: str = "stage",
                 one_row_per_input: bool = True, need_vram_bytes: int | None = None,
                 asset: str = "", setup: Callable[[], None] | None = None,
                 log: logging.Logger | logging.LoggerAdapter[Any] | None = None,
                 pipelined: bool = True, still_holds: Callable[[], bool] | None = None
                 ) -> None:
        self.fn, self.frame, self.batch_size = fn, frame.reset_index(drop=True), batch_size
        self.schema, self.ckpt, self.cadence = schema, checkpointer, cadence
        self.hooks, self.name, self.log = list(hooks), name, log or _log
        self.one_row_per_input = one_row_per_input
        self.setup = setup
        total = -(-len(self.frame) // batch_size)
        self.progress = Progress(batches_total=total, rows_total=len(self.frame))
        self.run_info = StageRun(name, self.progress, self.log, need_vram_bytes, asset,
                                 still_holds)
        self._frames: dict[str, list[pd.DataFrame]] = {VALID: [], QUARANTINE: [], CASES: []}
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
            except BaseException:
                self._save_completed("interrupted")  # lose no completed batch
                raise
            finally:
                self._done.set()
                if self._worker is not None:
                    self._worker.shutdown(wait=True)
                meta = self._end()
        valid = self._frames[VALID] or [_normalised(empty_frame(self.schema))]
        return Outcome(
            output=_concat(valid), quarantine=_concat(self._frames[QUARANTINE]),
            failure_cases=_concat(self._frames[CASES]), rows_in=len(self.frame),
            batches=self.progress.batches_total, checkpoints=self.ckpt.saves,
            resumed_from_batch=self.progress.resumed_from_batch,
            wall_seconds=time.monotonic() - started, model_calls=self.model_calls,
            hook_metadata=meta,
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
            self._join()  # pipelined: batch index-1, checked while the model ran this one
            self._announce()
            if self._worker is None:
                self._complete(index, batch, out)
                self._announce()
            else:
                self._checking = self._worker.submit(self._complete, index, batch, out)
            per_batch = max(per_batch, time.monotonic() - began)
        self._join()
        self._announce()
        self._save_completed("finished")

    def _call_model(self, index: int) -> tuple[pd.DataFrame, pd.DataFrame]:
        start = index * self.batch_size
        batch = self.frame.iloc[start:start + self.batch_size]
        self.model_calls += 1
        out = self.fn(batch, index)
        if not isinstance(out, pd.DataFrame):
            raise ConfigError(
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

    def _complete(self, index: int, batch: pd.DataFrame, out: pd.DataFrame) -> None:
        """Validate and normalise batch ``index``'s output and add it: on the worker thread
        when pipelined (batches strictly in order, since row numbers count the output rows
        of the batches before), else on the loop's thread."""
        try:
            if self.one_row_per_input and len(out) != len(batch):
                report = reject_all(batch, self.schema, "<rows>",
                                    "one output row per input row",
                                    f"{len(out)} rows returned for {len(batch)} inputs",
                                    first_row=self._rows_out)
            else:
                report = validate(out, self.schema, first_row=self._rows_out)
            frames = _added(index, report)
        except Exception as exc:
            exc.add_note(f"{self.name}: raised while validating the output of batch {index}")
            raise
        with self._lock:
            for kind, frame in frames.items():
                self._frames[kind].append(frame)
            self._rows_out += report.rows_checked
            self.progress.batches_done = index + 1
            self.progress.rows_done = min((index + 1) * self.batch_size, len(self.frame))
            self.progress.last_progress = time.monotonic()
            self._pending += 1

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
        restored = self.ckpt.restore()
        if restored is None:
            return
        done = int(restored.step)
        if done > self.progress.batches_total or restored.metadata.get("rows_total") != len(
                self.frame):
            self.log.warning(f"{self.name}: checkpoint at batch {done} does not match this "
                             "input; starting from the beginning (it is left in place)")
            # restore() adopted its shards for the next save; drop them, or a later resume
            # would read this input's rows after the other input's.
            self.ckpt.forget()
            return
        for kind, data in restored.shards:
            self._frames[kind].append(parquet.loads(data))
        self._rows_out = sum(len(f) for f in self._frames[VALID] + self._frames[QUARANTINE])
        self.progress.batches_done = self.progress.resumed_from_batch = done
        self.progress.rows_done = min(done * self.batch_size, len(self.frame))
        self.progress._rows_at_resume = self.progress.rows_done
        self.log.info(f"{self.name}: resuming from checkpoint after batch {done} "
                      f"({self.progress.rows_done}/{self.progress.rows_total} rows done)")

    def _save(self, *, wait: bool = False) -> None:
        with self._lock:
            if self._pending == 0:
                return
            fresh = {kind: frames[len(frames) - self._pending:]
                     for kind, frames in self._frames.items()}
            shards = [(kind, _encoder(frames)) for kind, frames in fresh.items()]
            self.ckpt.save(self.progress.batches_done, new_shards=shards,
                           metadata={"rows_total": len(self.frame)})
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


def _added(index: int, report: Report) -> dict[str, pd.DataFrame]:
    """Batch ``index``'s frames as the loop keeps (and checkpoints) them, normalised."""
    if report.clean:
        quarantine, cases = _no_failures()
    else:
        quarantine, cases = _quarantine(index, report), _cases(index, report)
    return {VALID: _normalised(report.valid), QUARANTINE: quarantine, CASES: cases}


def _quarantine(index: int, report: Report) -> pd.DataFrame:
    quarantine = report.quarantined.reset_index()
    quarantine.insert(0, "batch", index)
    return _normalised(quarantine)


def _cases(index: int, report: Report) -> pd.DataFrame:
    cases = report.failure_cases.assign(batch=index)
    cases["index"] = pd.to_numeric(cases["index"], errors="coerce").astype("float64")
    return _normalised(cases)


@functools.cache
def _no_failures() -> tuple[pd.DataFrame, pd.DataFrame]:
    """The quarantine and failure-case frames of a batch without failures, normalised
    once (~3 ms a batch otherwise): they have no rows, so the batch number is in none and
    every batch's are the same. Shared, never mutated (concatenation copies)."""
    clean = Report(pd.DataFrame(), empty_quarantine(), no_cases())
    return _quarantine(0, clean), _cases(0, clean)


def _encoder(frames: list[pd.DataFrame]) -> Callable[[], memoryview]:
    """Encode later, in the checkpoint writer thread (the frames are never mutated)."""
    return lambda: parquet.dumps(_concat(frames))


def _normalised(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame as it will read back from a checkpoint shard: through Arrow, as Parquet
    does (types settle there), without paying for Parquet's encoding on every batch."""
    return parquet.normalised(frame.reset_index(drop=True))


def _concat(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Empty frames (a batch with no valid rows) are left out when any frame has rows:
    pandas counts their dtypes, so an empty ``object`` column would turn int64 into object.
    The rule holds for shards of frames and for the frames alike, so a resumed run and an
    uninterrupted one concatenate to the same dtypes."""
    if not frames:
        return pd.DataFrame()
    return pd.concat([f for f in frames if len(f)] or frames[:1], ignore_index=True)


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
