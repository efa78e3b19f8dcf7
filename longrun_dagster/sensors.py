"""The stalled-run sensor: the Dagster and OS shell around ``recovery``'s reconciler. Every
tick it reads the stage runs (every live one, and the ended ones within the horizon that
some partition may still need), judges each (live, stalled, or ended and how), ends the
stalled ones (terminate, wait until terminal, then force), and asks ``reconcile`` what
every wanted partition needs: nothing, a relaunch (a run key per source run and partitions,
so a repeated request is one run), a duplicate ended, or a visible give-up. Nothing is
decided for ever: the next tick sees the same difference if this one's work was lost.
"""

import dataclasses
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from functools import partial
from typing import Any

import dagster as dg
import psutil

from longrun_dagster import tags as T
from longrun_dagster.heartbeat import kernel, start_ticks
from longrun_dagster.recovery import (
    PARTITION_TAG,
    RANGE_END_TAG,
    RANGE_START_TAG,
    End,
    Mark,
    ProcessIdentity,
    Reconciliation,
    Relaunch,
    RunView,
    Timing,
    Verdict,
    end_of,
    judge,
    reconcile,
)

__all__ = ["ATTEMPT_TAG", "LIVE", "PARTITION_TAG", "RANGE_END_TAG", "RANGE_START_TAG",
           "RELAUNCHED_FROM_TAG", "RunView", "process_alive_here", "stalled_run_sensor"]

ATTEMPT_TAG = T.ATTEMPT
RELAUNCHED_FROM_TAG = T.RELAUNCHED_FROM
LIVE = (dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED,
        dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED,
        dg.DagsterRunStatus.CANCELING)
ENDED = (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)
CRASH_ERRORS = frozenset({
    "ChildProcessCrashException", "DagsterExecutionInterruptedError", "KeyboardInterrupt",
    "Preempted", "SegmentEnded", "GpuMemoryExceeded", "StorageError", "CommitConflict",
    "LeaseLost", "ObjectNotFound", "CorruptObject", "OSError", "ConnectionError",
    "TimeoutError", "MemoryError", "OperationalError"})
"""Step failures that no code of the stage caused (a dead process, an interrupt, storage,
the GPU guard's hard limit, the run database): crash-like, relaunched."""
HORIZON_DAYS = 7.0
LAUNCHER_PATIENCE = 10.0
"""Seconds a run launcher's terminate may take past the kill grace before the run is
marked failed anyway (it would set CANCELING after the forced failure)."""


def stalled_run_sensor(
    *,
    stall_timeout_seconds: float = 900.0,
    retry_budget: int = 3,
    minimum_interval_seconds: int = 30,
    kill_grace_seconds: float = 10.0,
    start_grace_seconds: float = 120.0,
    retry_patience_seconds: float = 300.0,
    horizon_days: float = HORIZON_DAYS,
    slot_wait_seconds: float | None = None,
    name: str = "longrun_stalled_runs",
    target: Any = None,
) -> dg.SensorDefinition:
    """A sensor for ``dagster-daemon`` that keeps every partition a model-stage run wanted
    (within ``horizon_days``) either committed or worked on by exactly one live run.

    Each tick it ends stalled runs (no progress for ``stall_timeout_seconds``, use the same
    as the stages' ``Heartbeat`` or more; a process gone; a launch not finished within
    ``start_grace_seconds``), giving each ``kill_grace_seconds`` after its terminate, and
    relaunches every partition whose runs all ended without committing it: killed,
    preempted, stalled, out of memory, lost with its worker. Up to ``retry_budget``
    attempts per partition. A run whose stage's code raised (or went over its bad-row
    budget) or that a person canceled is not relaunched; it gets a ``longrun/gave_up`` tag
    and a line in its run log. With Dagster's run retries on, a failed run gets
    ``retry_patience_seconds`` for its retry to come (a retry is just a live run); then the
    sensor relaunches it. A run waiting for a pool slot is live for as long as it waits
    (``slot_wait_seconds``: at most that long; a worker that dies while it waits is failed
    by Dagster's run monitoring, then relaunched)."""
    timing = Timing(stall_timeout_seconds, start_grace_seconds, retry_patience_seconds,
                    kill_grace_seconds, slot_wait_seconds)

    @dg.sensor(name=name, minimum_interval_seconds=minimum_interval_seconds,
               target=target or dg.AssetSelection.all(),
               default_status=dg.DefaultSensorStatus.RUNNING,
               description=f"Relaunches model-stage partitions whose runs stalled or crashed "
                           f"(stall timeout {stall_timeout_seconds:.0f}s, retry budget "
                           f"{retry_budget}).")
    def _sensor(context: dg.SensorEvaluationContext) -> Iterator[dg.RunRequest | dg.SkipReason]:
        now = time.time()
        settled = _settled(context.cursor)
        tick = Tick(context.instance, context.log, timing, _partitions_of(context))
        result, horizon_ids = tick.run(now, settled, retry_budget, horizon_days)
        keep = (settled & horizon_ids) | set(result.settled)
        context.update_cursor(json.dumps({"v": 3, "settled": sorted(keep)}))
        requests = [_request(r) for r in result.relaunch]
        if not requests:
            yield dg.SkipReason(f"{result.wanted} wanted partition(s): {result.waiting} being "
                                f"worked on, {result.unsatisfied} unsatisfied, none to "
                                "relaunch")
        yield from requests

    return _sensor


def _settled(raw: str | None) -> set[str]:
    """Ended runs no partition needs any more (a lost cursor only costs reading them)."""
    try:
        data = json.loads(raw) if raw else {}
        ids = data.get("settled", []) if isinstance(data, dict) else []
        return {i for i in ids if isinstance(i, str)}
    except ValueError:
        return set()


PartitionsOf = Callable[[tuple[str, ...], str, str], tuple[str, ...]]


def _partitions_of(context: dg.SensorEvaluationContext) -> PartitionsOf:
    """The partitions of a range run's range, in order, from its assets' definition."""
    cache: dict[tuple[tuple[str, ...], str, str], tuple[str, ...]] = {}

    def expand(assets: tuple[str, ...], first: str, last: str) -> tuple[str, ...]:
        key = (assets, first, last)
        if key not in cache:
            cache[key] = (first, last)
            try:
                graph = context.repository_def.asset_graph  # type: ignore[union-attr]
                for asset in assets:
                    node = graph.get(dg.AssetKey.from_user_string(asset))
                    if node.partitions_def is not None:
                        cache[key] = tuple(node.partitions_def.get_partition_keys_in_range(
                            dg.PartitionKeyRange(first, last)))
                        break
            except Exception as exc:  # noqa: BLE001 - its ends still count as wanted
                context.log.warning(f"could not expand the range {first}...{last} of "
                                    f"{','.join(assets)}: {exc}")
        return cache[key]

    return expand


class Tick:
    """One reconciliation: read, judge, end the stalled, reconcile, act."""

    def __init__(self, instance: dg.DagsterInstance, log: Any, timing: Timing,
                 partitions_of: PartitionsOf) -> None:
        self.instance, self.log, self.timing = instance, log, timing
        self.partitions_of = partitions_of

    def run(self, now: float, settled: set[str], budget: int, horizon_days: float
            ) -> tuple[Reconciliation, set[str]]:
        instance = self.instance
        live = instance.get_run_records(filters=dg.RunsFilter(
            statuses=list(LIVE), tags={T.STAGE_RUN: "true"}))
        ended_ids = set(instance.get_run_ids(filters=dg.RunsFilter(
            statuses=list(ENDED), tags={T.STAGE_RUN: "true"},
            created_after=datetime.fromtimestamp(now - horizon_days * 86400, UTC))))
        fresh = sorted(ended_ids - settled)
        ended = instance.get_run_records(filters=dg.RunsFilter(run_ids=fresh)) if fresh else []
        waiting: dict[str, float] | None = None  # read only when a run may be waiting
        views: dict[str, RunView] = {}
        verdicts: dict[str, Verdict] = {}
        for record in [*live, *ended]:
            run_id = record.dagster_run.run_id
            try:  # one run's view never breaks the tick
                view = self._view(record)
                if waiting is None and view.running and not view.working:
                    waiting = _waiting_for_slots(instance, self.log)
                verdicts[run_id] = judge(view, now, self.timing, process_alive_here,
                                         (waiting or {}).get(run_id), self._step_over)
                views[run_id] = view
            except Exception as exc:  # noqa: BLE001
                self.log.warning(f"longrun: skipped run {run_id} this tick (could not read "
                                 f"it: {type(exc).__name__}: {exc})")
        stalled = [(views[i], v.reason) for i, v in verdicts.items() if v.stalled]
        for view, reason in self._end_all(stalled):
            views[view.run_id] = view
            verdicts[view.run_id] = Verdict(False, reason, end=end_of(view))
        satisfied = _Satisfied(instance)
        result = reconcile(views.values(), verdicts, satisfied, now=now, budget=budget,
                           retry_patience=self.timing.retry_patience,
                           retries_enabled=instance.run_retries_enabled)
        self._end_all(result.end)  # duplicates: counted as live until ended
        for mark in result.mark:
            self._guard(mark.run, partial(self._give_up, mark))
        for relaunch in result.relaunch:
            self._guard(relaunch.source, partial(self._note_relaunch, relaunch))
        return result, ended_ids

    # -- reading runs ------------------------------------------------------------------------

    def _view(self, record: Any) -> RunView:
        run = record.dagster_run
        launching = run.status in (dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.CANCELING)
        started = record.start_time or (record.update_timestamp.timestamp() if launching
                                        else None)
        ended_at = record.end_time or (record.update_timestamp.timestamp()
                                       if run.is_finished else None)
        view = RunView.of(run, created_at=record.create_timestamp.timestamp(),
                          started_at=started, ended_at=ended_at)
        if not run.asset_selection and T.SELECTION not in view.tags:
            # a schedule's run: its stages and what is downstream of them (read once)
            planned = tuple(sorted({*self._planned(run.run_id), *view.assets}))
            if planned:
                view = _replace(view, assets=planned)
        if view.partition_range is not None:
            view = _replace(view, partitions=self.partitions_of(view.assets,
                                                                *view.partition_range))
        if run.status == dg.DagsterRunStatus.FAILURE and view.ending is None and \
                view.stalled_at is None and not view.working:
            view = _replace(view, failure=self._failure(run.run_id))
        return view

    def _planned(self, run_id: str) -> tuple[str, ...]:
        """Every asset a run without an asset selection planned to materialize (a
        schedule's run: its stages and what is downstream of them), remembered in a tag.
        Unreadable (SQLite: a stage frozen mid-write holds its run's event log locked):
        none this tick; the run is judged by its tags, so the sensor can still end the
        process that holds the lock."""
        try:
            records = self.instance.get_records_for_run(
                run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION_PLANNED,
                limit=1000).records
        except Exception as exc:  # noqa: BLE001 - judged without it
            self.log.warning(f"longrun: could not read what run {run_id} planned "
                             f"({type(exc).__name__}: {exc}); judging it by its tags")
            return ()
        keys = {r.event_log_entry.dagster_event.asset_key for r in records
                if r.event_log_entry.dagster_event is not None}
        planned = tuple(sorted(k.to_user_string() for k in keys if k is not None))
        if planned:
            try:
                self._tag(run_id, {T.SELECTION: T.mark(run_id, ",".join(planned))})
            except Exception as exc:  # noqa: BLE001 - read again next tick
                self.log.warning(f"longrun: could not tag run {run_id}: {exc}")
        return planned

    def _failure(self, run_id: str) -> End:
        """How a failed run's steps failed: crash-like when no step failed at all (its
        process died first) or every failure is one no code of the stage caused."""
        try:
            failures = self.instance.get_records_for_run(
                run_id, of_type=dg.DagsterEventType.STEP_FAILURE, limit=20).records
        except Exception as exc:  # noqa: BLE001 - unknown: a crash (bounded by the budget)
            self.log.warning(f"longrun: could not read how run {run_id} failed "
                             f"({type(exc).__name__}: {exc}); taking it for a crash")
            return End.CRASH
        crash = all(_error_classes(r.event_log_entry) & CRASH_ERRORS for r in failures)
        return End.CRASH if crash else End.FAILED

    def _step_over(self, run: RunView) -> bool:
        """Whether a step of the run finished after its stages' last beat."""
        records = self.instance.get_records_for_run(
            run.run_id, of_type={dg.DagsterEventType.STEP_SUCCESS,
                                 dg.DagsterEventType.STEP_FAILURE},
            ascending=False, limit=1).records
        last = max((b.at for b in run.beats.values()), default=0.0)
        return bool(records) and records[0].event_log_entry.timestamp >= last

    # -- acting ------------------------------------------------------------------------------

    def _end_all(self, items: Sequence[tuple[RunView, str]]) -> list[tuple[RunView, str]]:
        """End every run (its reason written first), wait up to the kill grace for each to
        be terminal, mark the rest failed, free their pool slots; each in its final state.
        A run that cannot be ended now is left for the next tick (it is still stalled)."""
        marked = []
        for view, reason in items:
            if self._guard(view, partial(self._tag, view.run_id,
                                         {T.ENDING: T.mark(view.run_id, reason)})):
                marked.append((view, reason))
            else:  # SQLite: a process frozen mid-write may hold the lock; it goes first
                self._guard(view, partial(self._kill_frozen, view))
        stopping = [t for t in (self._guard(v, partial(self._stop, v)) for v, _ in marked)
                    if isinstance(t, threading.Thread)]
        deadline = time.time() + self.timing.kill_grace
        for thread in stopping:
            thread.join(max(0.0, deadline - time.time()))
        for thread in stopping:  # a terminate still running would undo a forced failure
            thread.join(max(0.0, deadline + LAUNCHER_PATIENCE - time.time()))
        ended = []
        for view, reason in marked:
            record = self._guard(view, partial(self._final, view, reason, deadline))
            if record is None or record is False or not record.dagster_run.is_finished:
                continue
            _free_slots(self.instance, view.run_id, self.log)
            self._guard(view, partial(self._event, view.run_id,
                                      f"longrun: ended run ({reason})"))
            ended.append((_replace(view, status=record.dagster_run.status.value,
                                   ending=reason, ended_at=time.time()), reason))
        return ended

    def _guard(self, run: RunView, work: Callable[[], Any]) -> Any:
        """``work`` for one run; an error is logged and the tick goes on (False)."""
        try:
            result = work()
        except Exception as exc:  # noqa: BLE001 - one run never breaks the tick
            self.log.warning(f"longrun: run {run.run_id}: {type(exc).__name__}: {exc}")
            return False
        return True if result is None else result

    def _stop(self, run: RunView) -> threading.Thread | None:
        """Stop the run's work. Processes this host can name are signalled (SIGTERM: the
        stage checkpoints and Dagster reports the run failed; SIGKILL when frozen); a run
        elsewhere is terminated through the run launcher, in a thread of its own (it can
        block on a hung worker)."""
        if run.terminal:
            return None
        if run.status in ("QUEUED", "NOT_STARTED"):  # never launched: nothing to stop
            record = _record(self.instance, run.run_id)
            if record is not None and not record.dagster_run.is_finished:
                self.instance.report_run_canceled(record.dagster_run, message=(
                    f"longrun: canceled by the sensor ({run.ending or 'duplicate'})"))
            return None
        here = [b.process for b in run.working if process_alive_here_of(b.process)]
        if run.stalled_at is not None:
            return None  # its watchdog is exiting it
        if here:
            for process in here:
                _signal(process, signal.SIGKILL if _stopped(process) else signal.SIGTERM,
                        self.log)
            return None
        thread = threading.Thread(target=_launcher_terminate,
                                  args=(self.instance, run.run_id, self.log), daemon=True)
        thread.start()
        return thread

    def _kill_frozen(self, run: RunView) -> None:
        """SIGKILL the run's stopped (frozen) processes that this host can name: on SQLite
        one stopped in the middle of a write holds the database locked, so nothing about
        the run can be written (not even why it is ended) until it is gone. The next tick
        ends the run as usual."""
        for beat in run.working:
            if process_alive_here_of(beat.process) and _stopped(beat.process):
                _signal(beat.process, signal.SIGKILL, self.log)

    def _final(self, run: RunView, reason: str, deadline: float) -> Any:
        while True:
            record = _record(self.instance, run.run_id)
            if record is None or record.dagster_run.is_finished or time.time() >= deadline:
                break
            time.sleep(0.25)
        if record is not None and not record.dagster_run.is_finished:
            for beat in run.beats.values():
                _signal(beat.process, signal.SIGKILL, self.log)
            self.instance.report_run_failed(record.dagster_run, message=(
                f"longrun: run ended by the sensor ({reason}) and not terminal within its "
                "kill grace; marked failed"))
            record = _record(self.instance, run.run_id) or record
        return record

    def _give_up(self, mark: Mark) -> None:
        run = mark.run
        self._tag(run.run_id, {T.GAVE_UP: T.mark(run.run_id, mark.why)})
        message = (f"longrun: partition(s) {run.partition} of {','.join(run.assets)} not "
                   f"relaunched: {mark.why}")
        self._event(run.run_id, message)
        self.log.warning(f"{message} (run {run.run_id})")

    def _note_relaunch(self, relaunch: Relaunch) -> None:
        """Keep Dagster from re-executing a run the sensor relaunches (a failure its worker
        reports late), and say why in its log, once."""
        source = relaunch.source
        if source.tags.get(T.HANDLED) == "relaunch":
            return
        extra = {T.MAX_RETRIES: "0", T.WILL_RETRY: "false"} \
            if source.status == "FAILURE" and not source.retried_by else {}
        self._tag(source.run_id, {T.HANDLED: T.mark(source.run_id, "relaunch"), **extra})
        parts = ", ".join(relaunch.partitions) or "(unpartitioned)"
        message = (f"longrun: relaunching {','.join(source.assets)} for {parts} as attempt "
                   f"{relaunch.attempt} (run key {relaunch.run_key}): {relaunch.why}")
        self._event(source.run_id, message)
        self.log.info(message)

    def _tag(self, run_id: str, values: dict[str, str]) -> None:
        self.instance.add_run_tags(run_id, {**values, T.RUN_ID: run_id})

    def _event(self, run_id: str, message: str) -> None:
        run = self.instance.get_run_by_id(run_id)
        if run is not None:
            self.instance.report_engine_event(message, run)


def _replace(view: RunView, **changes: Any) -> RunView:
    return dataclasses.replace(view, **changes)


class _Satisfied:
    """Whether (asset, partition) was materialized after a time (memoized in a tick)."""

    def __init__(self, instance: dg.DagsterInstance) -> None:
        self.instance = instance
        self.memo: dict[tuple[str, str, float], bool] = {}

    def __call__(self, asset: str, partition: str, after: float) -> bool:
        key = (asset, partition, after)
        if key not in self.memo:
            records = self.instance.fetch_materializations(dg.AssetRecordsFilter(
                asset_key=dg.AssetKey.from_user_string(asset),
                asset_partitions=[partition] if partition else None,
                after_timestamp=after), limit=1)
            self.memo[key] = bool(records.records)
        return self.memo[key]


def _waiting_for_slots(instance: dg.DagsterInstance, log: Any) -> dict[str, float]:
    """Runs with a step waiting for a pool slot (not assigned one yet), and since when."""
    storage = instance.event_log_storage
    waiting: dict[str, float] = {}
    try:
        if not storage.supports_global_concurrency_limits:
            return waiting
        keys = storage.get_concurrency_keys()
        for info in storage.get_concurrency_infos(sorted(keys)).values():
            for step in info.pending_steps:
                if step.assigned_timestamp is None:
                    since = step.enqueued_timestamp.timestamp()
                    waiting[step.run_id] = min(since, waiting.get(step.run_id, since))
    except Exception as exc:  # noqa: BLE001 - no pools: nobody waits for one
        log.warning(f"could not read the pools' waiting steps: {exc}")
    return waiting


def _error_classes(entry: Any) -> set[str]:
    """The class names along a step failure's error chain."""
    event = entry.dagster_event
    data = getattr(event, "step_failure_data", None) if event is not None else None
    error, names = getattr(data, "error", None), set[str]()
    while error is not None and len(names) < 20:
        names.add(getattr(error, "cls_name", None) or "")
        error = getattr(error, "cause", None) or getattr(error, "context", None)
    return names


def _record(instance: dg.DagsterInstance, run_id: str) -> Any:
    records = instance.get_run_records(filters=dg.RunsFilter(run_ids=[run_id]), limit=1)
    return records[0] if records else None


def _launcher_terminate(instance: dg.DagsterInstance, run_id: str, log: Any) -> None:
    try:
        instance.run_launcher.terminate(run_id)
    except Exception as exc:  # noqa: BLE001 - a launcher that cannot terminate: escalated
        log.warning(f"run launcher could not terminate {run_id}: {exc}")


def _free_slots(instance: dg.DagsterInstance, run_id: str, log: Any) -> None:
    """A run that never finished its step keeps its pool slot (the GPU) until Dagster's run
    monitoring frees it, if ever: free it now."""
    storage = instance.event_log_storage
    try:
        if storage.supports_global_concurrency_limits:
            storage.free_concurrency_slots_for_run(run_id)
    except Exception as exc:  # noqa: BLE001 - a storage without pools; nothing held
        log.warning(f"could not free the concurrency slots of run {run_id}: {exc}")


# -- processes -------------------------------------------------------------------------------

def process_alive_here(process: ProcessIdentity | None) -> bool | None:
    """True/False for a process when this host can name it for sure (same kernel, same pid
    namespace, same pid and start ticks); None when it cannot be told from here."""
    if process is None or not _same_table(process):
        return None
    if not process.started.startswith("t"):
        return None  # a beat from before 0.3 (wall-clock start): cannot be told for sure
    proc = _verified(process)
    if proc is None:
        return False
    try:
        return bool(proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def process_alive_here_of(process: ProcessIdentity | None) -> bool:
    return process_alive_here(process) is True


def _same_table(process: ProcessIdentity) -> bool:
    boot, ns = kernel()
    return process.same_kernel_and_namespace(ProcessIdentity("", 0, boot, ns))


def _verified(process: ProcessIdentity | None) -> psutil.Process | None:
    """The live process the identity names, or None (gone, another process now has its
    pid, or it lives where this host cannot see)."""
    if process is None or not _same_table(process) or not process.started.startswith("t"):
        return None
    try:
        proc = psutil.Process(process.pid)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    if start_ticks(process.pid) != process.started:
        return None  # the pid was reused by another process
    return proc


def _signal(process: ProcessIdentity | None, sig: int, log: Any) -> bool:
    """Send ``sig`` to the process only if it is verifiably the one named."""
    proc = _verified(process)
    if proc is None:
        return False
    try:
        proc.send_signal(sig)  # psutil re-checks its own start time before signalling
        return True
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied as exc:
        log.warning(f"not allowed to signal process {proc.pid}: {exc}")
        return False


def _stopped(process: ProcessIdentity | None) -> bool:
    proc = _verified(process)
    try:
        return proc is not None and proc.status() == psutil.STATUS_STOPPED
    except psutil.NoSuchProcess:
        return False


# -- run requests ------------------------------------------------------------------------------

def _user_tags(run: RunView) -> dict[str, str]:
    """The run's own tags a user or schedule set (not Dagster's, not this library's)."""
    return {k: v for k, v in run.tags.items()
            if not k.startswith(("dagster/", ".dagster/", "longrun/"))}


def _request(relaunch: Relaunch) -> dg.RunRequest:
    """A run of the source's assets over the partitions (or the same range part: its
    committed partitions are reused, the one in progress resumes from its checkpoint)."""
    source = relaunch.source
    selection = [dg.AssetKey.from_user_string(k) for k in source.assets]
    tags = {**_user_tags(source), ATTEMPT_TAG: str(relaunch.attempt),
            RELAUNCHED_FROM_TAG: source.run_id, T.STAGE_RUN: "true"}
    if relaunch.segment > 1:
        tags[T.SEGMENT] = str(relaunch.segment)
    parts = relaunch.partitions
    if source.partition_range is not None and parts:
        return dg.RunRequest(run_key=relaunch.run_key, asset_selection=selection, tags={
            **tags, RANGE_START_TAG: parts[0], RANGE_END_TAG: parts[-1]})
    return dg.RunRequest(run_key=relaunch.run_key, asset_selection=selection, tags=tags,
                         partition_key=parts[0] if parts else None)
