"""The stalled-run sensor: finds model-stage runs that stopped progressing (hung, frozen,
killed, node gone), ends them, and relaunches the same partitions, which resume from
their checkpoints.

``find_stalled`` and ``plan`` are the decisions, as pure functions; ``stalled_run_sensor``
is the Dagster shell that feeds them the instance's runs and carries them out.
"""

import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import dagster as dg

from longrun_dagster import tags as T

ATTEMPT_TAG = T.ATTEMPT
RELAUNCHED_FROM_TAG = T.RELAUNCHED_FROM
HANDLED_TAG = T.HANDLED
PARTITION_TAG = "dagster/partition"
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"
LIVE = (dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED,
        dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED,
        dg.DagsterRunStatus.CANCELING)


@dataclass(frozen=True)
class RunView:
    """What the decisions need to know about a run."""

    run_id: str
    status: str
    started_at: float | None
    progress_at: float | None
    pid: int | None
    host: str | None
    partition: str | None
    assets: tuple[str, ...]
    attempt: int = 1
    relaunched_from: str | None = None
    handled: str | None = None
    """What the sensor decided for this run already (relaunch, give_up, leave)."""
    crashed: bool = False
    """It failed with no step failure: its process died mid-step (kill -9, OOM killer)."""
    continuation: bool = False
    """Its time budget ended a segment and the partition asked to continue."""
    segment: int = 1
    stalled_at: float | None = None
    stage_ended: bool = False
    """Its last stage step is over (the run may go on with other steps, or wait for a pool
    slot for the next stage): no stage is in progress to stall."""
    will_retry: bool = False
    """It failed and Dagster's run retries will re-execute it."""
    partition_range: tuple[str, str] | None = None
    """A range run's first and last partition (``partition`` then reads "first...last")."""

    @classmethod
    def of(cls, run: dg.DagsterRun, started_at: float | None, crashed: bool = False
           ) -> "RunView":
        tags = T.own(run.tags, run.run_id, run.parent_run_id)
        progress_at = pid = host = None
        state = ""
        if T.HEARTBEAT in tags:
            at, _, pid_text, host, state = (tags[T.HEARTBEAT].split("|") + [""] * 5)[:5]
            progress_at, pid = float(at), int(pid_text) if pid_text.isdigit() else None
        keys = tuple(sorted(k.to_user_string() for k in (run.asset_selection or ()))) or \
            tuple(a for a in tags.get(T.ASSETS, "").split(",") if a)
        span = (tags[RANGE_START_TAG], tags[RANGE_END_TAG]) \
            if PARTITION_TAG not in tags and RANGE_START_TAG in tags and RANGE_END_TAG in tags \
            else None
        return cls(
            run_id=run.run_id, status=run.status.value, started_at=started_at,
            progress_at=progress_at, pid=pid, host=host or None,
            partition=f"{span[0]}...{span[1]}" if span else tags.get(PARTITION_TAG),
            partition_range=span, assets=keys,
            attempt=int(tags.get(ATTEMPT_TAG, "1")),
            relaunched_from=tags.get(RELAUNCHED_FROM_TAG), handled=tags.get(HANDLED_TAG),
            stalled_at=float(tags[T.STALLED]) if T.STALLED in tags else None,
            crashed=crashed, continuation=tags.get(T.CONTINUATION) == "requested",
            segment=int(tags.get(T.SEGMENT, "1")), stage_ended=state == T.HEARTBEAT_ENDED,
            will_retry=tags.get(T.WILL_RETRY) == "true",
        )


@dataclass(frozen=True)
class Stalled:
    run: RunView
    reason: str


def find_stalled(runs: Iterable[RunView], now: float, timeout: float,
                 process_alive: Callable[[RunView], bool | None],
                 start_grace: float | None = None) -> list[Stalled]:
    """Running stage runs whose process is gone, or that made no progress for ``timeout``
    seconds since their last heartbeat (or, before their first one, ``start_grace``
    seconds since the run started: a loaded machine can take longer than a short stall
    timeout to start a step), and runs whose own watchdog reported a stall (those may
    already show as failed)."""
    found = []
    for run in runs:
        if run.handled:
            continue
        if run.continuation or run.status not in ("STARTED", "STARTING", "CANCELING") and not (
                run.status == "FAILURE" and (run.stalled_at is not None or run.crashed)):
            continue  # a failed run counts only when its process died or its watchdog fired
        if run.stage_ended and run.status != "FAILURE":
            continue  # between stages; a lost run worker is Dagster's run monitoring's to see
        alive = process_alive(run)
        last = run.progress_at or run.started_at
        allowed = timeout if run.progress_at else max(timeout, start_grace or timeout)
        if run.stalled_at is not None:
            found.append(Stalled(run, "its watchdog reported a stall and exited the process"))
        elif run.crashed:
            found.append(Stalled(run, "its process died in the middle of a step"))
        elif alive is False:
            found.append(Stalled(run, f"its process {run.pid} on {run.host} is gone"))
        elif last is not None and now - last > allowed:
            found.append(Stalled(run, f"no progress for {now - last:.0f}s "
                                      f"(stall timeout {timeout:.0f}s)"))
    return found


@dataclass(frozen=True)
class Plan:
    """What to do about one stalled run: ``relaunch`` (with the next attempt number),
    ``give_up`` (retry budget spent), ``leave`` (committed, or a live run has it), or
    ``dagster_retry`` (Dagster's run retries re-execute it)."""

    stalled: Stalled
    action: str
    attempt: int
    why: str


def continuations(runs: Iterable[RunView]) -> list[RunView]:
    """Failed runs that ended a time-boxed segment on purpose and want the next one."""
    return [r for r in runs if r.status == "FAILURE" and r.continuation and not r.handled
            and not r.will_retry]  # Dagster's run retry continues it (in its backfill)


def plan(stalled: Stalled, live: Sequence[RunView], committed: bool, budget: int) -> Plan:
    run = stalled.run
    if committed:
        return Plan(stalled, "leave", run.attempt, "its partition is committed already")
    if run.will_retry:
        return Plan(stalled, "dagster_retry", run.attempt, "Dagster's run retries re-execute it "
                    "(as part of its backfill, if any); it resumes from the checkpoint")
    for other in live:
        if other.run_id != run.run_id and other.partition == run.partition and \
                set(other.assets) & set(run.assets):
            return Plan(stalled, "leave", run.attempt,
                        f"run {other.run_id} is already working on this partition")
    if run.attempt >= budget:
        return Plan(stalled, "give_up", run.attempt,
                    f"attempt {run.attempt} of {budget} stalled; retry budget spent")
    return Plan(stalled, "relaunch", run.attempt + 1, stalled.reason)


def process_alive_here(run: RunView) -> bool | None:
    """True/False for a process on this host; None when it cannot be told from here."""
    if run.pid is None or run.host != socket.gethostname():
        return None
    try:
        os.kill(run.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _not_zombie(run.pid)


def _state(pid: int) -> str:
    """The process state letter from /proc (R, S, D, T stopped, Z zombie), or ''."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0]
    except (OSError, IndexError):
        return ""


def _not_zombie(pid: int) -> bool:
    return _state(pid) != "Z"


def _stopped(pid: int) -> bool:
    return _state(pid) in ("T", "t")


def stalled_run_sensor(
    *,
    stall_timeout_seconds: float = 900.0,
    retry_budget: int = 3,
    minimum_interval_seconds: int = 30,
    kill_grace_seconds: float = 10.0,
    start_grace_seconds: float = 120.0,
    name: str = "longrun_stalled_runs",
    target: Any = None,
) -> dg.SensorDefinition:
    """A sensor for ``dagster-daemon`` that ends stalled model-stage runs and relaunches
    their partitions (tagged with the attempt number and the stalled run's id), up to
    ``retry_budget`` attempts per partition. State lives in run tags, so the sensor
    survives its own restarts. Use the same ``stall_timeout_seconds`` as the stages'
    ``Heartbeat`` resource (or more). A run that has not published its first heartbeat
    yet (its process is starting) gets ``start_grace_seconds`` from its start instead."""

    @dg.sensor(name=name, minimum_interval_seconds=minimum_interval_seconds,
               target=target or dg.AssetSelection.all(),
               default_status=dg.DefaultSensorStatus.RUNNING,
               description=f"Relaunches model-stage runs silent for over "
                           f"{stall_timeout_seconds:.0f}s (retry budget {retry_budget}).")
    def _sensor(context: dg.SensorEvaluationContext) -> Iterator[dg.RunRequest | dg.SkipReason]:
        instance = context.instance
        now = time.time()
        stage = {T.STAGE_RUN: "true"}
        live = instance.get_run_records(filters=dg.RunsFilter(statuses=list(LIVE), tags=stage))
        # Failed runs matter when their watchdog or the OOM killer ended them; look at each
        # failed run once (the cursor is the newest update seen), not on every tick.
        since = float(context.cursor) if context.cursor else now - 86400
        failed = instance.get_run_records(
            filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE], tags=stage,
                                  updated_after=datetime.fromtimestamp(since, UTC)),
            limit=200)
        views = [_view(rec) for rec in live]
        views += [_view(rec, _crashed(instance, rec.dagster_run)) for rec in failed
                  if HANDLED_TAG not in _own(rec.dagster_run)]
        if failed:
            context.update_cursor(str(max(r.update_timestamp.timestamp() for r in failed)))
        pending = instance.get_runs(filters=dg.RunsFilter(
            tags={T.DECIDED: "relaunch"},
            updated_after=datetime.fromtimestamp(now - 3600, UTC)), limit=100)
        # Requests are idempotent (run_key): repeat them for every run decided "relaunch", so
        # a tick that failed after tagging, or a daemon restart, never loses a relaunch.
        relaunch = [v for v in map(_decided, pending) if v.handled == "relaunch"
                    and not v.will_retry]
        requests = [_continue(v) for v in map(_decided, instance.get_runs(
            filters=dg.RunsFilter(tags={T.DECIDED: "continue"},
                                  updated_after=datetime.fromtimestamp(now - 3600, UTC)),
            limit=100)) if v.handled == "continue"]
        for run in continuations(views):
            decision = plan(Stalled(run, "segment ended"), views, False, budget=10**9)
            if decision.action == "relaunch":
                _decide(instance, run.run_id, "continue")
                requests.append(_continue(run))
        for item in find_stalled(views, now, stall_timeout_seconds, process_alive_here,
                                 start_grace=start_grace_seconds):
            decision = plan(item, views, _committed_since(instance, item.run), retry_budget)
            _end(instance, item, decision, kill_grace_seconds, context.log)
            if decision.action == "relaunch" and _dagster_retries(instance, item.run):
                context.log.info(f"run {item.run.run_id}: Dagster's run retries re-execute "
                                 "it; no relaunch")
            elif decision.action == "relaunch":
                relaunch.append(item.run)
        requests += [_relaunch(v) for v in relaunch]
        if not requests:
            yield dg.SkipReason(f"{len(views)} stage run(s) watched, none stalled")
        yield from requests

    return _sensor


def _own(run: dg.DagsterRun) -> Any:
    return T.own(run.tags, run.run_id, run.parent_run_id)


def _decided(run: dg.DagsterRun) -> RunView:
    return RunView.of(run, None)


def _decide(instance: dg.DagsterInstance, run_id: str, action: str) -> None:
    instance.add_run_tags(run_id, {HANDLED_TAG: T.mark(run_id, action), T.DECIDED: action,
                                   T.RUN_ID: run_id})


def _dagster_retries(instance: dg.DagsterInstance, run: RunView) -> bool:
    """Whether Dagster marked the run (just reported failed) for a re-execution by its run
    retries: that one keeps the run's backfill and lineage, so it goes instead of ours."""
    fresh = instance.get_run_by_id(run.run_id)
    if fresh is None or fresh.tags.get(T.WILL_RETRY) != "true":
        return False
    _decide(instance, run.run_id, "dagster_retry")
    return True


def _view(record: Any, crashed: bool = False) -> RunView:
    started = record.start_time or record.create_timestamp.timestamp()
    return RunView.of(record.dagster_run, started, crashed)


def _crashed(instance: dg.DagsterInstance, run: dg.DagsterRun) -> bool:
    """A failed run with no STEP_FAILURE event: no code raised, the process died."""
    failures = instance.get_records_for_run(
        run.run_id, of_type=dg.DagsterEventType.STEP_FAILURE, limit=1).records
    return not failures


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


def _end(instance: dg.DagsterInstance, item: Stalled, decision: Plan, grace: float,
         log: Any) -> None:
    """Terminate the run, make sure its process is gone, mark it failed with the reason."""
    run = item.run
    _decide(instance, run.run_id, decision.action)
    if run.pid is not None and process_alive_here(run) and _stopped(run.pid):
        os.kill(run.pid, signal.SIGKILL)  # frozen (SIGSTOP): it can answer nothing, not even
        # the launcher's terminate, which would block the code server waiting on it
    else:  # terminate can still block on a hung worker: a thread of its own, then escalate
        threading.Thread(target=_terminate, args=(instance, run.run_id, log),
                         daemon=True).start()
    if run.pid is not None and process_alive_here(run):
        deadline = time.time() + grace
        while time.time() < deadline and process_alive_here(run):
            time.sleep(0.2)
        if process_alive_here(run):
            try:
                os.kill(run.pid, signal.SIGKILL)  # SIGINT never reaches a thread stuck in C
            except ProcessLookupError:
                pass
    dagster_run = instance.get_run_by_id(run.run_id)
    history = _history(instance, run)
    message = (f"longrun: run stalled ({item.reason}); {decision.action}: {decision.why}. "
               f"Attempts of partition {run.partition}: {history}")
    if dagster_run is not None and dagster_run.status in LIVE:
        instance.report_run_failed(dagster_run, message=message)
    log.info(message)


def _terminate(instance: dg.DagsterInstance, run_id: str, log: Any) -> None:
    try:
        instance.run_launcher.terminate(run_id)
    except Exception as exc:  # noqa: BLE001 - a launcher that cannot terminate: escalated
        log.warning(f"run launcher could not terminate {run_id}: {exc}")


def _history(instance: dg.DagsterInstance, run: RunView) -> str:
    chain: list[str] = []
    current: RunView | None = run
    while current is not None:
        chain.append(f"#{current.attempt} {current.run_id[:8]}")
        parent = current.relaunched_from and instance.get_run_by_id(current.relaunched_from)
        current = RunView.of(parent, None) if parent else None
    return " <- ".join(chain)


def _relaunch(run: RunView) -> dg.RunRequest:
    tags = {ATTEMPT_TAG: str(run.attempt + 1), RELAUNCHED_FROM_TAG: run.run_id}
    key = f"relaunch-{run.run_id}"  # at most one relaunch per stalled run, ever
    return _same_partitions(run, key, tags)


def _continue(run: RunView) -> dg.RunRequest:
    """The next time-boxed segment of the partition (same attempt, next segment)."""
    return _same_partitions(run, f"continue-{run.run_id}", {
        ATTEMPT_TAG: str(run.attempt), T.SEGMENT: str(run.segment + 1),
        RELAUNCHED_FROM_TAG: run.run_id})


def _same_partitions(run: RunView, key: str, tags: dict[str, str]) -> dg.RunRequest:
    """A run of the same assets over the same partition, or the same range (whose committed
    partitions it reuses, resuming the one in progress from its checkpoint)."""
    selection = [dg.AssetKey.from_user_string(k) for k in run.assets]
    if run.partition_range is not None:
        first, last = run.partition_range
        return dg.RunRequest(run_key=key, asset_selection=selection, tags={
            **tags, RANGE_START_TAG: first, RANGE_END_TAG: last})
    return dg.RunRequest(run_key=key, partition_key=run.partition, tags=tags,
                         asset_selection=selection)
