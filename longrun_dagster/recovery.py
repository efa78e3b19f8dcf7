"""Stalled-run recovery as pure decisions: the heartbeat codec, what the sensor knows of a
run (``RunView``), which runs stalled (``find_stalled``) and what to do about each
(``plan``). No Dagster calls and no OS calls here; ``sensors.py`` is the shell that feeds
these the instance's runs and carries the actions out.

The rules (DESIGN.md, "Recovery wherever the run executes"): a process is signalled only
when its whole identity matches (``ProcessIdentity``); a stalled run is ended first and
decided once, from its final state; a failed run whose last stage heartbeat is not
``ended`` crashed, whatever events its executor wrote.
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from longrun_dagster import tags as T

PARTITION_TAG = "dagster/partition"
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"
LIVE_STATUSES = ("QUEUED", "NOT_STARTED", "STARTING", "STARTED", "CANCELING")
RUNNING_STATUSES = ("STARTING", "STARTED", "CANCELING")
TERMINAL_STATUSES = ("SUCCESS", "FAILURE", "CANCELED")


class Action(StrEnum):
    """What the sensor does about a stalled (or finished-segment) run."""

    RELAUNCH = "relaunch"
    """A new run of the same selection and partition, the next attempt."""
    CONTINUE = "continue"
    """The next time-boxed segment of the same attempt."""
    DAGSTER_RETRY = "dagster_retry"
    """Dagster's run retries re-execute it (it keeps its backfill and lineage)."""
    LEAVE = "leave"
    """Nothing: its partition is committed, or a live run is working on it."""
    GIVE_UP = "give_up"
    """The partition's retry budget is spent."""


@dataclass(frozen=True)
class ProcessIdentity:
    """A process, named so that no other process can match it: the kernel it runs under
    (boot id), its pid namespace, its pid there, and its start time. A pid alone is reused,
    and a hostname is shared by containers on the host network."""

    host: str
    pid: int
    boot_id: str = ""
    pid_ns: str = ""
    started: float = 0.0
    """Process start time (psutil's ``create_time``), seconds since the epoch."""

    def same_kernel_and_namespace(self, other: "ProcessIdentity") -> bool:
        """Whether a pid of ``other``'s names the same process table as this one's (then
        signals can be checked and sent). Unknown boot ids or namespaces never match."""
        return bool(self.boot_id and self.pid_ns and self.boot_id == other.boot_id
                    and self.pid_ns == other.pid_ns)


@dataclass(frozen=True)
class Beat:
    """One heartbeat: the time of the last progress (not the time it was sent), batches
    done of the total, the process doing the work, and whether the stage step is over.

    Encoded as ``at|done/total|pid|host|state|boot_id|pid_ns|started`` (0.1 wrote the
    first four or five fields; they still decode, with an identity that never matches)."""

    at: float
    done: int = 0
    total: int | None = None
    process: ProcessIdentity | None = None
    ended: bool = False

    def encode(self) -> str:
        p = self.process
        total = "?" if self.total is None else str(self.total)
        fields = [f"{self.at:.3f}", f"{self.done}/{total}", str(p.pid) if p else "",
                  p.host if p else "", T.HEARTBEAT_ENDED if self.ended else "",
                  p.boot_id if p else "", p.pid_ns if p else "",
                  f"{p.started:.3f}" if p else ""]
        return "|".join(fields)

    @classmethod
    def decode(cls, text: str) -> "Beat":
        at, counts, pid, host, state, boot, ns, started = (text.split("|") + [""] * 8)[:8]
        done, _, total = counts.partition("/")
        process = ProcessIdentity(host, int(pid), boot, ns, float(started or 0.0)) \
            if pid.isdigit() else None
        return cls(float(at), int(done) if done.isdigit() else 0,
                   int(total) if total.isdigit() else None, process,
                   state == T.HEARTBEAT_ENDED)


@dataclass(frozen=True)
class RunView:
    """What the decisions need to know about a run."""

    run_id: str
    status: str
    started_at: float | None
    progress_at: float | None
    process: ProcessIdentity | None
    partition: str | None
    assets: tuple[str, ...]
    attempt: int = 1
    relaunched_from: str | None = None
    handled: str | None = None
    """What the sensor decided for this run already (an ``Action`` value)."""
    crashed: bool = False
    """It failed while a stage step was in progress: its process died (kill -9, the OOM
    killer, a lost node), whatever its executor reported."""
    continuation: bool = False
    """Its time budget ended a segment and the partition asked to continue."""
    segment: int = 1
    stalled_at: float | None = None
    stage_ended: bool = False
    """Its last stage step said it is over (the run may go on with other steps, or wait for
    a pool slot for the next stage)."""
    will_retry: bool | None = None
    """Dagster's verdict on a failed run: its run retries re-execute it (True), not (False),
    or not said yet (None)."""
    retried_by: str | None = None
    """The run Dagster's run retries launched for it."""
    partition_range: tuple[str, str] | None = None
    """A range run's first and last partition (``partition`` then reads "first...last")."""
    job_name: str = ""
    tags: Mapping[str, str] | None = None
    """Its own tags (life tags of other runs dropped): a relaunch carries the user's."""

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def host(self) -> str | None:
        return self.process.host if self.process else None

    @property
    def running(self) -> bool:
        return self.status in RUNNING_STATUSES

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @classmethod
    def of(cls, run: Any, started_at: float | None, crashed: bool = False) -> "RunView":
        """The view of a ``DagsterRun`` (read through its attributes only). ``crashed``: the
        shell found no step failure for this failed run (its process died before any
        heartbeat said what it was doing)."""
        tags = T.own(run.tags, run.run_id, run.parent_run_id)
        beat = Beat.decode(tags[T.HEARTBEAT]) if T.HEARTBEAT in tags else None
        keys = tuple(sorted(k.to_user_string() for k in (run.asset_selection or ()))) or \
            tuple(a for a in (tags.get(T.SELECTION) or tags.get(T.ASSETS, "")).split(",") if a)
        span = (tags[RANGE_START_TAG], tags[RANGE_END_TAG]) \
            if PARTITION_TAG not in tags and RANGE_START_TAG in tags and RANGE_END_TAG in tags \
            else None
        status = run.status.value
        will_retry = tags.get(T.WILL_RETRY)
        return cls(
            run_id=run.run_id, status=status, started_at=started_at,
            progress_at=beat.at if beat else None, process=beat.process if beat else None,
            partition=f"{span[0]}...{span[1]}" if span else tags.get(PARTITION_TAG),
            partition_range=span, assets=keys,
            attempt=int(tags.get(T.ATTEMPT, "1")),
            relaunched_from=tags.get(T.RELAUNCHED_FROM), handled=tags.get(T.HANDLED),
            stalled_at=float(tags[T.STALLED]) if T.STALLED in tags else None,
            crashed=status == "FAILURE" and (crashed or (beat is not None and not beat.ended)),
            continuation=tags.get(T.CONTINUATION) == "requested",
            segment=int(tags.get(T.SEGMENT, "1")), stage_ended=bool(beat and beat.ended),
            will_retry=None if will_retry is None else will_retry == "true",
            retried_by=tags.get(T.AUTO_RETRY_RUN_ID), job_name=run.job_name, tags=tags,
        )


@dataclass(frozen=True)
class Stalled:
    run: RunView
    reason: str


ProcessCheck = Callable[[RunView], bool | None]
"""True/False: the run's process is alive/gone; None: it cannot be told from here."""


def find_stalled(runs: Iterable[RunView], now: float, timeout: float,
                 process_alive: ProcessCheck, start_grace: float | None = None,
                 step_over: ProcessCheck | None = None) -> list[Stalled]:
    """Stage runs that stopped: running ones whose process is gone, or that made no progress
    for ``timeout`` seconds since their last heartbeat (before their first one,
    ``start_grace`` seconds since the run started: a loaded machine can take longer than a
    short stall timeout to start a step), running ones frozen after their stage said
    ``ended`` but before its step finished (``step_over`` says whether it did), and failed
    ones that crashed or whose watchdog fired."""
    found = []
    for run in runs:
        if run.handled or run.continuation:
            continue
        if not run.running and not (run.status == "FAILURE" and
                                    (run.stalled_at is not None or run.crashed)):
            continue  # a failed run counts only when its process died or its watchdog fired
        last = run.progress_at or run.started_at
        if run.stalled_at is not None:
            found.append(Stalled(run, "its watchdog reported a stall and exited the process"))
        elif run.crashed:
            found.append(Stalled(run, "its process died in the middle of a stage step"))
        elif run.stage_ended:
            # between stages (a next step, a pool slot) unless the step never finished
            if last is not None and now - last > timeout and step_over is not None \
                    and step_over(run) is False:
                found.append(Stalled(run, f"its stage ended {now - last:.0f}s ago but its "
                                          "step never finished (frozen before its commit)"))
        elif process_alive(run) is False:
            found.append(Stalled(run, f"its process {run.pid} on {run.host} is gone"))
        elif last is not None and now - last > (
                timeout if run.progress_at else max(timeout, start_grace or timeout)):
            found.append(Stalled(run, f"no progress for {now - last:.0f}s "
                                      f"(stall timeout {timeout:.0f}s)"))
    return found


@dataclass(frozen=True)
class Plan:
    """What to do about one stalled run, and why (for the run log)."""

    stalled: Stalled
    action: Action
    attempt: int
    why: str


def continuations(runs: Iterable[RunView]) -> list[RunView]:
    """Failed runs that ended a time-boxed segment on purpose and want the next one."""
    return [r for r in runs if r.status == "FAILURE" and r.continuation and not r.handled
            and not r.will_retry]  # Dagster's run retry continues it (in its backfill)


def plan(stalled: Stalled, live: Sequence[RunView], committed: bool, budget: int) -> Plan:
    """The one decision for a stalled run that has reached its final state."""
    run = stalled.run
    if committed:
        return Plan(stalled, Action.LEAVE, run.attempt, "its partition is committed already")
    if run.status == "FAILURE" and run.will_retry:
        return Plan(stalled, Action.DAGSTER_RETRY, run.attempt,
                    "Dagster's run retries re-execute it (as part of its backfill, if any); "
                    "it resumes from the checkpoint")
    for other in live:
        if other.run_id != run.run_id and other.partition == run.partition and \
                set(other.assets) & set(run.assets):
            return Plan(stalled, Action.LEAVE, run.attempt,
                        f"run {other.run_id} is already working on this partition")
    if run.attempt >= budget:
        return Plan(stalled, Action.GIVE_UP, run.attempt,
                    f"attempt {run.attempt} of {budget} stalled; retry budget spent")
    return Plan(stalled, Action.RELAUNCH, run.attempt + 1, stalled.reason)


def undecided(run: RunView, retries_enabled: bool) -> bool:
    """A failed run whose retry verdict Dagster has not written yet (it writes the status
    first, then ``dagster/will_retry``): deciding now could launch a run beside its retry."""
    return run.status == "FAILURE" and retries_enabled and run.will_retry is None


def retry_fell_through(run: RunView, now: float, decided_at: float, patience: float) -> bool:
    """A run left to Dagster's run retries that will not be re-executed after all: it ended
    CANCELED (a terminate that landed after its failure), Dagster changed its verdict, or
    no re-execution came within ``patience`` seconds. Then the sensor relaunches it:
    never neither."""
    if run.retried_by:
        return False
    return run.status != "FAILURE" or run.will_retry is False or now - decided_at > patience


def failure_page(updated: Sequence[tuple[float, str]], cursor: tuple[float, Sequence[str]],
                 limit: int) -> tuple[list[str], tuple[float, list[str]]]:
    """The failed runs a tick looks at, oldest update first, and the cursor after them.
    ``updated``: (update time, run id) of runs updated at or after the cursor's time, in
    ascending order; the cursor remembers the ids seen at its time, so a page boundary
    inside one timestamp skips nothing and repeats nothing."""
    since, seen = cursor
    fresh = [(t, r) for t, r in updated if t > since or (t == since and r not in seen)]
    page = fresh[:limit]
    if not page:
        return [], (since, list(seen))
    last = page[-1][0]
    at_last = [r for t, r in page if t == last] + (list(seen) if last == since else [])
    return [r for _, r in page], (last, at_last)
