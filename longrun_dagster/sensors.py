"""The stalled-run sensor: the Dagster and OS shell around ``recovery``'s decisions. It
finds model-stage runs that stopped progressing (hung, frozen, killed, node gone), ends
each (terminate, wait until it is terminal, then force it), decides once from its final
state, and relaunches the same selection and partitions, which resume from their
checkpoints; or leaves the run to Dagster's run retries, and relaunches it after all if
no re-execution comes.
"""

import dataclasses
import json
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import dagster as dg
import psutil

from longrun_dagster import tags as T
from longrun_dagster.heartbeat import current_process
from longrun_dagster.recovery import (
    PARTITION_TAG,
    RANGE_END_TAG,
    RANGE_START_TAG,
    Action,
    Plan,
    ProcessIdentity,
    RunView,
    Stalled,
    continuations,
    failure_page,
    find_stalled,
    plan,
    retry_fell_through,
    undecided,
)

__all__ = ["ATTEMPT_TAG", "HANDLED_TAG", "LIVE", "PARTITION_TAG", "RANGE_END_TAG",
           "RANGE_START_TAG", "RELAUNCHED_FROM_TAG", "Action", "Plan", "RunView", "Stalled",
           "continuations", "find_stalled", "plan", "process_alive_here",
           "stalled_run_sensor"]

ATTEMPT_TAG = T.ATTEMPT
RELAUNCHED_FROM_TAG = T.RELAUNCHED_FROM
HANDLED_TAG = T.HANDLED
LIVE = (dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED,
        dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED,
        dg.DagsterRunStatus.CANCELING)
FAILURES_PER_TICK = 50
"""Failed runs looked at per tick (a stalled one costs a few instance queries); the rest
wait for the next ticks, in order."""
DECIDED_PER_TICK = 2000
CRASH_ERRORS = ("ChildProcessCrashException",)
"""Step failures an executor writes for a step process that died (not code that raised)."""


def stalled_run_sensor(
    *,
    stall_timeout_seconds: float = 900.0,
    retry_budget: int = 3,
    minimum_interval_seconds: int = 30,
    kill_grace_seconds: float = 10.0,
    start_grace_seconds: float = 120.0,
    retry_patience_seconds: float = 300.0,
    name: str = "longrun_stalled_runs",
    target: Any = None,
) -> dg.SensorDefinition:
    """A sensor for ``dagster-daemon`` that ends stalled model-stage runs and relaunches
    their partitions (tagged with the attempt number and the stalled run's id), up to
    ``retry_budget`` attempts per partition. State lives in run tags, so the sensor
    survives its own restarts. Use the same ``stall_timeout_seconds`` as the stages'
    ``Heartbeat`` resource (or more). A run that has not published its first heartbeat
    yet (its process is starting) gets ``start_grace_seconds`` from its start instead;
    one still STARTING (a launch the daemon never finished, a pod not scheduled) gets it
    from its launch. The sensor's relaunches are watched from their creation.
    A stalled run gets ``kill_grace_seconds`` to end after its terminate before the sensor
    marks it failed itself; a run left to Dagster's run retries that sees no re-execution
    within ``retry_patience_seconds`` (or ends CANCELED) is relaunched by the sensor."""

    @dg.sensor(name=name, minimum_interval_seconds=minimum_interval_seconds,
               target=target or dg.AssetSelection.all(),
               default_status=dg.DefaultSensorStatus.RUNNING,
               description=f"Relaunches model-stage runs silent for over "
                           f"{stall_timeout_seconds:.0f}s (retry budget {retry_budget}).")
    def _sensor(context: dg.SensorEvaluationContext) -> Iterator[dg.RunRequest | dg.SkipReason]:
        instance, log = context.instance, context.log
        now = time.time()
        live = [_view(rec) for rec in instance.get_run_records(
            filters=dg.RunsFilter(statuses=list(LIVE), tags={T.STAGE_RUN: "true"}))]
        failed, cursor = _failed_since(instance, context.cursor, now)
        views = live + failed
        _watch_dagster_retries(instance, now, retry_patience_seconds, retry_budget, log)
        for run in continuations(views):
            decision = plan(Stalled(run, "segment ended"), views, False, budget=10**9)
            if decision.action == Action.RELAUNCH:
                _decide(instance, run.run_id, Action.CONTINUE)
        stalled = find_stalled(views, now, stall_timeout_seconds, process_alive_here,
                               start_grace=start_grace_seconds,
                               step_over=lambda r: _step_over(instance, r))
        for item in _end_all(instance, stalled, kill_grace_seconds, log):
            item = _with_planned_assets(instance, item)
            decision = plan(item, [v for v in live if v.run_id != item.run.run_id],
                            _committed_since(instance, item.run), retry_budget)
            _carry_out(instance, decision, log)
        if cursor is not None:
            context.update_cursor(cursor)
        # Requests are idempotent (run_key): repeat them for every run decided so, so a tick
        # that failed after tagging, or a daemon restart, never loses a relaunch.
        requests = [_relaunch(v) for v in _decided_runs(instance, Action.RELAUNCH, now)]
        requests += [_continue(v) for v in _decided_runs(instance, Action.CONTINUE, now)]
        if not requests:
            yield dg.SkipReason(f"{len(views)} stage run(s) watched, none stalled")
        yield from requests

    return _sensor


# -- reading runs ----------------------------------------------------------------------------

def _view(record: Any, crashed: bool = False) -> RunView:
    """The run as the decisions see it. It started when its worker said so; before that,
    a run being launched (STARTING, or CANCELING from there) counts from its last status
    change, not its creation: it may have waited in the queue for hours."""
    run = record.dagster_run
    launching = run.status in (dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.CANCELING)
    started = record.start_time or (
        record.update_timestamp if launching else record.create_timestamp).timestamp()
    return RunView.of(run, started, crashed)


def _failed_since(instance: dg.DagsterInstance, raw_cursor: str | None, now: float
                  ) -> tuple[list[RunView], str | None]:
    """Failed stage runs updated since the cursor, at most ``FAILURES_PER_TICK`` of them,
    oldest first (the rest on the next ticks: none is skipped), and the new cursor."""
    since, seen = _parse_cursor(raw_cursor, now)
    records = instance.get_run_records(
        filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE],
                              tags={T.STAGE_RUN: "true"},
                              updated_after=datetime.fromtimestamp(since - 0.001, UTC)),
        limit=FAILURES_PER_TICK + len(seen) + 1, order_by="update_timestamp", ascending=True)
    by_id = {r.dagster_run.run_id: r for r in records}
    page, (last, at_last) = failure_page(
        [(r.update_timestamp.timestamp(), r.dagster_run.run_id) for r in records],
        (since, seen), FAILURES_PER_TICK)
    views = []
    for run_id in page:
        record = by_id[run_id]
        if HANDLED_TAG in _own(record.dagster_run):
            continue
        # a heartbeat says whether its stage was mid-step; without one, the events tell
        has_beat = T.HEARTBEAT in _own(record.dagster_run)
        views.append(_view(record, not has_beat and _crashed(instance, record.dagster_run)))
    changed = page or raw_cursor is None
    return views, json.dumps({"t": last, "seen": at_last}) if changed else None


def _parse_cursor(raw: str | None, now: float) -> tuple[float, list[str]]:
    if not raw:
        return now - 86400, []
    if raw.startswith("{"):
        data = json.loads(raw)
        return float(data["t"]), list(data["seen"])
    return float(raw), []  # 0.1's cursor: the newest update time seen


def _own(run: dg.DagsterRun) -> Any:
    return T.own(run.tags, run.run_id, run.parent_run_id)


def _crashed(instance: dg.DagsterInstance, run: dg.DagsterRun) -> bool:
    """A failed run whose failure no code raised: no STEP_FAILURE at all (its process died
    before any step could fail), or only ones the executor wrote for a dead step process.
    (A failed run whose last heartbeat is not ``ended`` counts as crashed in any case.)"""
    failures = instance.get_records_for_run(
        run.run_id, of_type=dg.DagsterEventType.STEP_FAILURE, limit=20).records
    return all(_error_class(r.event_log_entry) in CRASH_ERRORS for r in failures)


def _error_class(entry: Any) -> str | None:
    event = entry.dagster_event
    data = getattr(event, "step_failure_data", None) if event is not None else None
    error = getattr(data, "error", None)
    return getattr(error, "cls_name", None)


def _step_over(instance: dg.DagsterInstance, run: RunView) -> bool:
    """Whether a step of the run finished after its stage's last progress (after an
    ``ended`` beat: the stage's own step finished, and the run went on)."""
    records = instance.get_records_for_run(
        run.run_id, of_type={dg.DagsterEventType.STEP_SUCCESS,
                             dg.DagsterEventType.STEP_FAILURE}, ascending=False, limit=1).records
    return bool(records) and records[0].event_log_entry.timestamp >= (run.progress_at or 0.0)


def _committed_since(instance: dg.DagsterInstance, run: RunView) -> bool:
    """Whether every asset of the run got a materialization of its partition since the
    run started (then the work is done and relaunching would only reuse it)."""
    if not run.assets or run.started_at is None:
        return False
    # a range run commits its partitions in order: its last one tells
    partition = run.partition_range[1] if run.partition_range else run.partition
    for key in run.assets:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey.from_user_string(key),
                                  asset_partitions=[partition] if partition else None,
                                  after_timestamp=run.started_at), limit=1)
        if not records.records:
            return False
    return True


def _decided_runs(instance: dg.DagsterInstance, action: Action, now: float) -> list[RunView]:
    """Runs decided so in the last hour (a request per run is repeated on every tick until
    then: the run key makes it one run, and a tick that died after deciding loses none)."""
    runs = instance.get_runs(filters=dg.RunsFilter(
        tags={T.DECIDED: action.value}, updated_after=datetime.fromtimestamp(now - 3600, UTC)),
        limit=DECIDED_PER_TICK)
    return [v for v in (RunView.of(r, None) for r in runs) if v.handled == action.value]


# -- processes -------------------------------------------------------------------------------

def process_alive_here(run: RunView) -> bool | None:
    """True/False for the run's process when this host can name it for sure (same kernel,
    same pid namespace, same pid and start time); None when it cannot be told from here."""
    proc = _verified(run.process)
    if proc is None:
        return None if run.process is None or not _same_table(run.process) else False
    try:
        return bool(proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _same_table(process: ProcessIdentity) -> bool:
    return process.same_kernel_and_namespace(current_process())


def _verified(process: ProcessIdentity | None) -> psutil.Process | None:
    """The live process the identity names, or None (gone, another process now has its
    pid, or it lives where this host cannot see)."""
    if process is None or not _same_table(process):
        return None
    try:
        proc = psutil.Process(process.pid)
        if abs(proc.create_time() - process.started) > 0.01:
            return None  # the pid was reused by another process
        return proc
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _signal(process: ProcessIdentity | None, sig: int, log: Any) -> bool:
    """Send ``sig`` to the process only if it is verifiably the one named."""
    proc = _verified(process)
    if proc is None:
        return False
    try:
        proc.send_signal(sig)  # psutil re-checks the start time before signalling
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


# -- ending a stalled run ----------------------------------------------------------------------

def _end_all(instance: dg.DagsterInstance, stalled: Sequence[Stalled], grace: float,
             log: Any) -> list[Stalled]:
    """End every stalled run still running, wait up to ``grace`` seconds for each to be
    terminal, mark the rest failed, and return each with its run's final state. Slots they
    held are freed."""
    stopping = [t for t in (_stop(instance, item, log) for item in stalled if item.run.running)
                if t is not None]
    deadline = time.time() + grace
    for thread in stopping:
        thread.join(max(0.0, deadline - time.time()))
    ended = []
    for item in stalled:
        run = _final(instance, item, deadline, log)
        if run is not None:
            _free_slots(instance, run.run_id, log)
            ended.append(Stalled(run, item.reason))
    return ended


def _stop(instance: dg.DagsterInstance, item: Stalled, log: Any) -> threading.Thread | None:
    """Stop the run's work. A process this host can name is signalled (SIGTERM: the stage
    checkpoints and Dagster reports the run failed; SIGKILL when frozen, since it answers
    nothing); one that is gone or ending itself is left; one elsewhere is terminated
    through the run launcher, in a thread of its own (it can block on a hung worker)."""
    run = item.run
    alive = process_alive_here(run)
    if run.stalled_at is not None or alive is False:
        return None  # its watchdog is exiting it, or it is gone: nothing to stop
    if alive:
        _signal(run.process, signal.SIGKILL if _stopped(run.process) else signal.SIGTERM, log)
        return None
    thread = threading.Thread(target=_launcher_terminate, args=(instance, run.run_id, log),
                              daemon=True)
    thread.start()
    return thread


def _launcher_terminate(instance: dg.DagsterInstance, run_id: str, log: Any) -> None:
    try:
        instance.run_launcher.terminate(run_id)
    except Exception as exc:  # noqa: BLE001 - a launcher that cannot terminate: escalated
        log.warning(f"run launcher could not terminate {run_id}: {exc}")


def _final(instance: dg.DagsterInstance, item: Stalled, deadline: float, log: Any
           ) -> RunView | None:
    """The run once terminal: waited for until ``deadline``, then its process killed (when
    verifiable here) and the run marked failed with the reason."""
    run_id = item.run.run_id
    while True:
        record = _record(instance, run_id)
        if record is None:
            return None
        # a failed run's retry verdict follows its status: decide with it, not before
        if record.dagster_run.is_finished and not undecided(
                _view(record), instance.run_retries_enabled) or time.time() >= deadline:
            break
        time.sleep(0.25)
    if not record.dagster_run.is_finished:
        _signal(item.run.process, signal.SIGKILL, log)  # SIGINT never reaches a thread
        # stuck in C; a process on another host ends itself (its watchdog sees the run end)
        instance.report_run_failed(record.dagster_run, message=(
            f"longrun: run stalled ({item.reason}) and did not end within its kill grace; "
            "marked failed"))
        record = _record(instance, run_id) or record
    return _view(record, item.run.crashed)


def _record(instance: dg.DagsterInstance, run_id: str) -> Any:
    records = instance.get_run_records(filters=dg.RunsFilter(run_ids=[run_id]), limit=1)
    return records[0] if records else None


def _free_slots(instance: dg.DagsterInstance, run_id: str, log: Any) -> None:
    """A run that never finished its step keeps its pool slot (the GPU) until Dagster's run
    monitoring frees it, if ever: free it now."""
    storage = instance.event_log_storage
    try:
        if storage.supports_global_concurrency_limits:
            storage.free_concurrency_slots_for_run(run_id)
    except Exception as exc:  # noqa: BLE001 - a storage without pools; nothing held
        log.warning(f"could not free the concurrency slots of run {run_id}: {exc}")


# -- deciding --------------------------------------------------------------------------------

def _carry_out(instance: dg.DagsterInstance, decision: Plan, log: Any) -> None:
    run = decision.stalled.run
    if decision.action == Action.RELAUNCH and not run.assets:
        decision = Plan(decision.stalled, Action.GIVE_UP, run.attempt,
                        "it selected no assets the sensor could relaunch")
    extra: dict[str, str] = {}
    if decision.action == Action.RELAUNCH:
        extra = {**_no_dagster_retry(), T.SELECTION: T.mark(run.run_id, ",".join(run.assets))}
    _decide(instance, run.run_id, decision.action, extra)
    message = (f"longrun: run stalled ({decision.stalled.reason}); {decision.action.value}: "
               f"{decision.why}. Attempts of partition {run.partition}: "
               f"{_history(instance, run)}")
    dagster_run = instance.get_run_by_id(run.run_id)
    if dagster_run is not None:
        instance.report_engine_event(message, dagster_run)
    log.info(message)


def _no_dagster_retry() -> dict[str, str]:
    """Tags that keep Dagster from re-executing a run the sensor relaunches (its worker may
    still report a failure late, when a frozen node wakes up)."""
    return {T.MAX_RETRIES: "0", T.WILL_RETRY: "false"}


def _decide(instance: dg.DagsterInstance, run_id: str, action: Action,
            extra: dict[str, str] | None = None) -> None:
    instance.add_run_tags(run_id, {
        HANDLED_TAG: T.mark(run_id, action.value), T.DECIDED: action.value,
        T.DECIDED_AT: T.mark(run_id, f"{time.time():.3f}"), T.RUN_ID: run_id, **(extra or {})})


def _with_planned_assets(instance: dg.DagsterInstance, item: Stalled) -> Stalled:
    """The stalled run with every asset it planned to materialize (its stages and the
    assets downstream: a schedule's run has no asset selection), which its relaunch selects
    and which must all be committed for the partition to count as done."""
    records = instance.get_records_for_run(
        item.run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION_PLANNED,
        limit=1000).records
    keys = {r.event_log_entry.dagster_event.asset_key for r in records
            if r.event_log_entry.dagster_event is not None}
    planned = tuple(sorted(k.to_user_string() for k in keys if k is not None))
    if not planned or set(planned) <= set(item.run.assets):
        return item
    return Stalled(dataclasses.replace(item.run, assets=planned), item.reason)


def _watch_dagster_retries(instance: dg.DagsterInstance, now: float, patience: float,
                           budget: int, log: Any) -> None:
    """Runs left to Dagster's run retries that will not be re-executed after all (they
    ended CANCELED after their failure, or nothing came): relaunched. Never neither."""
    for run in _decided_runs(instance, Action.DAGSTER_RETRY, now):
        decided_at = float((run.tags or {}).get(T.DECIDED_AT, now))
        if not retry_fell_through(run, now, decided_at, patience):
            continue
        why = ("Dagster's run retries did not re-execute it "
               f"(it is {run.status}, will_retry={run.will_retry})")
        decision = plan(Stalled(run, why), [], False, budget)
        if decision.action == Action.DAGSTER_RETRY:  # still FAILURE, patience spent
            decision = Plan(decision.stalled, Action.RELAUNCH, run.attempt + 1, why)
        _carry_out(instance, decision, log)


def _history(instance: dg.DagsterInstance, run: RunView) -> str:
    chain: list[str] = []
    current: RunView | None = run
    while current is not None:
        chain.append(f"#{current.attempt} {current.run_id[:8]}")
        parent = current.relaunched_from and instance.get_run_by_id(current.relaunched_from)
        current = RunView.of(parent, None) if parent else None
    return " <- ".join(chain)


# -- run requests ------------------------------------------------------------------------------

def _relaunch(run: RunView) -> dg.RunRequest:
    tags = {ATTEMPT_TAG: str(run.attempt + 1), RELAUNCHED_FROM_TAG: run.run_id}
    key = f"relaunch-{run.run_id}"  # at most one relaunch per stalled run, ever
    return _same_partitions(run, key, tags)


def _continue(run: RunView) -> dg.RunRequest:
    """The next time-boxed segment of the partition (same attempt, next segment)."""
    return _same_partitions(run, f"continue-{run.run_id}", {
        ATTEMPT_TAG: str(run.attempt), T.SEGMENT: str(run.segment + 1),
        RELAUNCHED_FROM_TAG: run.run_id})


def _user_tags(run: RunView) -> dict[str, str]:
    """The run's own tags a user or schedule set (not Dagster's, not this library's)."""
    return {k: v for k, v in (run.tags or {}).items()
            if not k.startswith(("dagster/", ".dagster/", "longrun/"))}


def _same_partitions(run: RunView, key: str, tags: dict[str, str]) -> dg.RunRequest:
    """A run of the same assets over the same partition, or the same range (whose committed
    partitions it reuses, resuming the one in progress from its checkpoint)."""
    selection = [dg.AssetKey.from_user_string(k) for k in run.assets]
    # watched from its creation: a launch the daemon never finished is a stall too
    tags = {**_user_tags(run), **tags, T.STAGE_RUN: "true"}
    if run.partition_range is not None:
        first, last = run.partition_range
        return dg.RunRequest(run_key=key, asset_selection=selection, tags={
            **tags, RANGE_START_TAG: first, RANGE_END_TAG: last})
    return dg.RunRequest(run_key=key, partition_key=run.partition, tags=tags,
                         asset_selection=selection)
