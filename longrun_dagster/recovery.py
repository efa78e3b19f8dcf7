"""Recovery as reconciliation, as pure decisions: the heartbeat codec, what the sensor knows
of a run (``RunView``), whether a run is live, stalled or ended and how (``judge``), and
what to do about every wanted partition (``reconcile``). No Dagster calls and no OS calls
here; ``sensors.py`` is the shell that feeds these the instance's runs and carries the
actions out.

Level-triggered (DESIGN.md, "Recovery as reconciliation"): every tick compares what is
wanted (each (asset, partition) a stage run targeted) with what is (its runs, their
materializations), and acts on the difference. Nothing is decided for ever: a tick that
died, a request that never reached the daemon, a retry that never came are all corrected by
the next tick, which sees the same difference. A process is signalled only when its whole
identity matches (``ProcessIdentity``); a malformed tag reads as no tag.
"""

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from longrun_dagster import tags as T

PARTITION_TAG = "dagster/partition"
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"
QUEUED_STATUSES = ("QUEUED", "NOT_STARTED")
LIVE_STATUSES = ("QUEUED", "NOT_STARTED", "STARTING", "STARTED", "CANCELING")
RUNNING_STATUSES = ("STARTING", "STARTED", "CANCELING")
TERMINAL_STATUSES = ("SUCCESS", "FAILURE", "CANCELED")


@dataclass(frozen=True)
class ProcessIdentity:
    """A process, named so that no other process can match it: the kernel it runs under
    (boot id), its pid namespace, its pid there, and its start time in clock ticks since
    boot (``/proc/<pid>/stat``), which no wall-clock step moves. A pid alone is reused, and
    a hostname is shared by containers on the host network."""

    host: str
    pid: int
    boot_id: str = ""
    pid_ns: str = ""
    started: str = ""
    """``t<ticks since boot>``; a beat from before 0.3 held a wall-clock time (never
    verifiable now: such a process is "cannot tell", never signalled)."""

    def same_kernel_and_namespace(self, other: "ProcessIdentity") -> bool:
        """Whether a pid of ``other``'s names the same process table as this one's (then
        signals can be checked and sent). Unknown boot ids or namespaces never match."""
        return bool(self.boot_id and self.pid_ns and self.boot_id == other.boot_id
                    and self.pid_ns == other.pid_ns)


class State(StrEnum):
    """What a stage step's last beat says about it."""

    WORKING = ""
    ENDED = "ended"
    """The step's stage finished its work (it may still fail after: a budget, a commit)."""
    PREEMPTED = "preempted"
    """SIGTERM or an interrupt stopped it: crash-like, relaunched."""
    FAILED = "failed"
    """The stage's code raised or its output went over the bad-row budget: deterministic,
    not relaunched."""
    ERROR = "error"
    """It stopped on an error that another attempt may not meet (storage, the GPU guard's
    hard limit, a lost claim): crash-like, relaunched."""


@dataclass(frozen=True)
class Beat:
    """One heartbeat of one stage step: the time of the last progress (not the time it was
    sent), batches done of the total, the process doing the work, the step's state, and
    the claim generation it holds (0: none yet).

    Encoded as ``at|done/total|pid|host|state|boot_id|pid_ns|started|generation``."""

    at: float
    done: int = 0
    total: int | None = None
    process: ProcessIdentity | None = None
    state: State = State.WORKING
    generation: int = 0

    @property
    def ended(self) -> bool:
        return self.state != State.WORKING

    def encode(self) -> str:
        p = self.process
        total = "?" if self.total is None else str(self.total)
        fields = [f"{self.at:.3f}", f"{self.done}/{total}", str(p.pid) if p else "",
                  p.host if p else "", self.state.value, p.boot_id if p else "",
                  p.pid_ns if p else "", p.started if p else "", str(self.generation)]
        return "|".join(fields)

    @classmethod
    def decode(cls, text: object) -> "Beat | None":
        """The beat, or None for anything malformed (a malformed tag reads as no tag)."""
        if not isinstance(text, str):
            return None
        at, counts, pid, host, state, boot, ns, started, gen = (text.split("|") + [""] * 9)[:9]
        try:
            when = float(at)
        except ValueError:
            return None
        if when != when or when in (float("inf"), float("-inf")):
            return None
        done, _, total = counts.partition("/")
        process = ProcessIdentity(host, int(pid), boot, ns, started) \
            if pid.isdigit() else None
        states = {s.value: s for s in State}
        return cls(when, int(done) if done.isdigit() else 0,
                   int(total) if total.isdigit() else None, process,
                   states.get(state, State.WORKING), int(gen) if gen.isdigit() else 0)


def _int(text: str | None, default: int) -> int:
    """A tag as a positive int, or ``default`` when absent or malformed."""
    return int(text) if text and text.isdigit() and 0 < int(text) < 10**6 else default


def _float(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and value == value and abs(value) < 1e12 else None


class End(StrEnum):
    """How a run that is no longer live ended, as the reconciler sees it."""

    SUCCESS = "success"
    CRASH = "crash"
    """Killed, preempted, stalled, out of memory, lost with its worker, ended by the
    sensor: relaunched, within the partition's budget."""
    FAILED = "failed"
    """The stage's code raised or went over its bad-row budget: not relaunched."""
    CANCELED = "canceled"
    """A person canceled it: not relaunched."""
    SEGMENT = "segment"
    """It ended a time-boxed segment on purpose: continued (no budget spent)."""
    DUPLICATE = "duplicate"
    """The sensor ended it because another live run held its partition."""


@dataclass(frozen=True)
class RunView:
    """What the decisions need to know about a run."""

    run_id: str
    status: str
    created_at: float
    """When the run was created (a partition it wants is satisfied by a materialization
    after this)."""
    started_at: float | None = None
    """When its worker started it (before that: when its launch began)."""
    assets: tuple[str, ...] = ()
    partitions: tuple[str, ...] = ()
    """Its partitions in order: one, or each of its range (empty: not partitioned)."""
    partition_range: tuple[str, str] | None = None
    beats: Mapping[str, Beat] = field(default_factory=dict)
    """The last beat of each of its stage steps (by asset key)."""
    attempt: int = 1
    segment: int = 1
    relaunched_from: str | None = None
    stalled_at: float | None = None
    """Its watchdog found it stalled (then it exited the process)."""
    superseded: bool = False
    continuation: bool = False
    ending: str | None = None
    """Why the sensor ended it (written before the terminate: whatever happens after, the
    next tick knows the run did not end by itself)."""
    marked: str | None = None
    """Why the sensor gave its partitions up (written once, visibly)."""
    will_retry: bool | None = None
    max_retries: int | None = None
    retried_by: str | None = None
    ended_at: float | None = None
    failure: End | None = None
    """How a failed run's steps failed, from its events (the shell reads them when its
    beats do not tell): ``FAILED`` when code raised, ``CRASH`` when a process died."""
    job_name: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
    """Its own tags (life tags of other runs dropped): a relaunch carries the user's."""

    @property
    def running(self) -> bool:
        return self.status in RUNNING_STATUSES

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def partition(self) -> str | None:
        """For people: the partition, or "first...last" of a range."""
        if self.partition_range:
            return f"{self.partition_range[0]}...{self.partition_range[1]}"
        return self.partitions[0] if self.partitions else None

    @property
    def working(self) -> list[Beat]:
        return [b for b in self.beats.values() if not b.ended]

    def claim_generation(self, asset: str) -> int:
        beat = self.beats.get(asset)
        return beat.generation if beat is not None else 0

    @classmethod
    def of(cls, run: Any, *, created_at: float, started_at: float | None = None,
           ended_at: float | None = None, partitions: Sequence[str] | None = None,
           failure: End | None = None) -> "RunView":
        """The view of a ``DagsterRun`` (read through its attributes only). ``partitions``:
        a range run's partitions, as the shell expanded them. Every tag is decoded
        tolerantly: a malformed one reads as absent."""
        tags = T.own(run.tags or {}, run.run_id, run.parent_run_id)
        beats = {step: b for step, raw in T.beats(tags).items()
                 if (b := Beat.decode(raw)) is not None}
        keys = tuple(sorted(k.to_user_string() for k in (run.asset_selection or ()))) or \
            tuple(a for a in (tags.get(T.SELECTION) or tags.get(T.ASSETS, "")).split(",") if a)
        span = (tags[RANGE_START_TAG], tags[RANGE_END_TAG]) \
            if PARTITION_TAG not in tags and RANGE_START_TAG in tags and RANGE_END_TAG in tags \
            else None
        if span is not None:
            parts = tuple(partitions) if partitions else span
        else:
            parts = (tags[PARTITION_TAG],) if tags.get(PARTITION_TAG) else ()
        will_retry = tags.get(T.WILL_RETRY)
        return cls(
            run_id=run.run_id, status=run.status.value, created_at=created_at,
            started_at=started_at, assets=keys, partitions=parts, partition_range=span,
            beats=beats, attempt=_int(tags.get(T.ATTEMPT), 1),
            segment=_int(tags.get(T.SEGMENT), 1), relaunched_from=tags.get(T.RELAUNCHED_FROM),
            stalled_at=_float(tags.get(T.STALLED)), superseded=T.SUPERSEDED in tags,
            continuation=tags.get(T.CONTINUATION) == "requested",
            ending=tags.get(T.ENDING), marked=tags.get(T.GAVE_UP),
            will_retry=None if will_retry not in ("true", "false") else will_retry == "true",
            max_retries=_int(tags.get(T.MAX_RETRIES), 0) if T.MAX_RETRIES in tags else None,
            retried_by=tags.get(T.AUTO_RETRY_RUN_ID), ended_at=ended_at, failure=failure,
            job_name=run.job_name, tags=tags,
        )


# -- one run: live, stalled, or ended (and how) ---------------------------------------------

@dataclass(frozen=True)
class Timing:
    """The sensor's patience."""

    stall_timeout: float = 900.0
    start_grace: float = 120.0
    retry_patience: float = 300.0
    kill_grace: float = 10.0
    slot_wait: float | None = None
    """How long a run may wait for a pool slot (None: as long as it takes; a worker that
    dies while it waits is failed by Dagster's run monitoring, then relaunched)."""


@dataclass(frozen=True)
class Verdict:
    live: bool
    reason: str
    stalled: bool = False
    end: End | None = None


ProcessCheck = Callable[[ProcessIdentity | None], bool | None]
"""True/False: the process is alive/gone; None: it cannot be told from here."""
StepCheck = Callable[["RunView"], bool | None]


def judge(run: RunView, now: float, timing: Timing, process_alive: ProcessCheck,
          waiting_since: float | None = None, step_over: StepCheck | None = None) -> Verdict:
    """Whether ``run`` is live (leave it), stalled (end it), or ended, and how. Each stage
    step is judged by its own beat: one step's ``ended`` says nothing of a parallel one.
    A run a person is canceling (CANCELING, not by the sensor) that stalls is ended as
    theirs: it is not relaunched."""
    verdict = _judge(run, now, timing, process_alive, waiting_since, step_over)
    if verdict.stalled and run.status == "CANCELING" and run.ending is None:
        return Verdict(False, f"{CANCELED_BY_PERSON}; {verdict.reason}", True)
    return verdict


def _judge(run: RunView, now: float, timing: Timing, process_alive: ProcessCheck,
           waiting_since: float | None, step_over: StepCheck | None) -> Verdict:
    if run.status in QUEUED_STATUSES:
        return Verdict(True, "queued")
    if run.terminal:
        return Verdict(False, f"ended {run.status}", end=end_of(run))
    started = run.started_at if run.started_at is not None else run.created_at
    if run.stalled_at is not None:
        return Verdict(False, "its watchdog reported a stall and exited the process", True)
    if run.status == "STARTING":
        if now - started > timing.start_grace:
            return Verdict(False, f"still starting {now - started:.0f}s after its launch "
                                  "(the launch never finished)", True)
        return Verdict(True, "starting")
    if run.ending is not None and now - (run.ended_at or started) > timing.kill_grace:
        return Verdict(False, f"ended by the sensor ({run.ending}) and still not terminal",
                       True)
    for asset, beat in sorted(run.beats.items()):
        if beat.ended:
            continue
        alive = process_alive(beat.process)
        if alive is False:
            p = beat.process
            return Verdict(False, f"the process of {asset or 'its stage'} "
                                  f"({p.pid if p else '?'} on {p.host if p else '?'}) is gone",
                           True)
        if now - beat.at > timing.stall_timeout:
            return Verdict(False, f"{asset or 'its stage'}: no progress for "
                                  f"{now - beat.at:.0f}s (stall timeout "
                                  f"{timing.stall_timeout:.0f}s)", True)
    if run.working:
        return Verdict(True, "progressing")
    if waiting_since is not None:
        if timing.slot_wait is not None and now - waiting_since > timing.slot_wait:
            return Verdict(False, f"waited {now - waiting_since:.0f}s for a pool slot "
                                  f"(limit {timing.slot_wait:.0f}s)", True)
        return Verdict(True, "waiting for a pool slot")
    if not run.beats:
        if now - started > max(timing.stall_timeout, timing.start_grace):
            return Verdict(False, f"no heartbeat {now - started:.0f}s after it started", True)
        return Verdict(True, "starting its first stage")
    last = max(b.at for b in run.beats.values())
    if now - last > timing.stall_timeout and step_over is not None and \
            step_over(run) is False:
        return Verdict(False, f"its stage ended {now - last:.0f}s ago but its step never "
                              "finished (frozen before its commit)", True)
    return Verdict(True, "between stages")


def end_of(run: RunView) -> End:
    """How a terminal run ended. Preempted is never "ended": only a beat that says its code
    raised (or a failure its events trace to code) is deterministic."""
    if run.status == "SUCCESS":
        return End.SUCCESS
    if run.ending is not None:
        if run.ending.startswith(CANCELED_BY_PERSON):
            return End.CANCELED
        return End.DUPLICATE if run.ending.startswith(DUPLICATE) else End.CRASH
    if run.continuation and run.status == "FAILURE":
        return End.SEGMENT
    if run.status == "CANCELED":
        return End.CANCELED
    if run.stalled_at is not None or run.superseded:
        return End.CRASH
    states = {b.state for b in run.beats.values()}
    if State.FAILED in states:
        return End.FAILED
    if states & {State.WORKING, State.PREEMPTED, State.ERROR}:
        return End.CRASH
    return run.failure or End.CRASH


DUPLICATE = "duplicate"
CANCELED_BY_PERSON = "canceled by a person"


# -- every wanted partition -------------------------------------------------------------------

Key = tuple[str, str]
"""(asset, partition); an unpartitioned asset has partition ""."""


@dataclass(frozen=True)
class Relaunch:
    """A new run of ``source``'s assets over ``partitions`` (one, or a contiguous part of its
    range), with a run key that makes a repeated request one run."""

    source: RunView
    partitions: tuple[str, ...]
    attempt: int
    segment: int
    why: str

    @property
    def run_key(self) -> str:
        span = f"{self.partitions[0]}..{self.partitions[-1]}" if self.partitions else ""
        return f"longrun-{self.source.run_id}-{span}"


@dataclass(frozen=True)
class Mark:
    """Partitions given up, visibly (a tag and a run-log line on ``run``)."""

    run: RunView
    why: str


@dataclass
class Reconciliation:
    relaunch: list[Relaunch] = field(default_factory=list)
    end: list[tuple[RunView, str]] = field(default_factory=list)
    mark: list[Mark] = field(default_factory=list)
    settled: list[str] = field(default_factory=list)
    """Terminal runs that no key needs any more (satisfied, given up, or not the latest
    want): later ticks need not read them."""
    waiting: int = 0
    wanted: int = 0
    unsatisfied: int = 0


Satisfied = Callable[[str, str, float], bool]
"""Whether (asset, partition) was materialized after the given time."""


def keys_of(run: RunView) -> list[Key]:
    return [(a, p) for a in run.assets for p in (run.partitions or ("",))]


def reconcile(runs: Iterable[RunView], verdicts: Mapping[str, Verdict], satisfied: Satisfied,
              *, now: float, budget: int, retry_patience: float,
              retries_enabled: bool) -> Reconciliation:
    """What to do about every wanted partition, from the runs that want it and their
    verdicts (a stalled run counts as ended: the shell ends it before acting on this)."""
    out = Reconciliation()
    views = {r.run_id: r for r in runs}
    by_key: dict[Key, list[RunView]] = defaultdict(list)
    for run in views.values():
        for key in keys_of(run):
            by_key[key].append(run)
    out.wanted = len(by_key)
    relaunch_keys: dict[str, set[str]] = defaultdict(set)  # source run -> partitions
    why: dict[str, str] = {}
    blocked: set[Key] = set()  # keys with a live run: no relaunch may cover them
    needed: set[str] = set()  # runs some key still needs

    ending: set[str] = set()

    def live(r: RunView) -> bool:
        v = verdicts.get(r.run_id)
        return v is not None and v.live

    for key, wanting in sorted(by_key.items()):
        wanting.sort(key=lambda r: (r.created_at, r.run_id))
        current = wanting[-1]
        alive = [r for r in wanting if live(r)]
        if len(alive) > 1:
            keep = _claim_holder(alive, key[0])
            for other in alive:
                if other is not keep and other.run_id not in ending:
                    ending.add(other.run_id)
                    out.end.append((other, f"{DUPLICATE}: run {keep.run_id} holds "
                                           f"{key[0]}[{key[1]}]"))
        if alive:
            blocked.add(key)
            needed.update(r.run_id for r in alive)
            needed.add(current.run_id)  # the latest want outlives an older live run
            out.waiting += 1
            continue
        if current.status == "SUCCESS":
            continue
        if satisfied(key[0], key[1], current.created_at):
            continue
        out.unsatisfied += 1
        verdict = verdicts.get(current.run_id)
        end = verdict.end if verdict is not None and verdict.end is not None else End.CRASH
        if current.marked is not None:
            continue  # given up already, visibly
        if end in (End.FAILED, End.CANCELED):
            out.mark.append(Mark(current, "its stage's code raised or went over its bad-row "
                                          "budget; not relaunched (fix it and launch again)"
                                 if end == End.FAILED else
                                 "a person canceled it; not relaunched"))
            continue
        if end in (End.CRASH, End.SEGMENT) and _dagster_retries(
                current, now, retry_patience, retries_enabled):
            needed.add(current.run_id)
            out.waiting += 1
            continue
        if end == End.CRASH and current.attempt >= budget:
            out.mark.append(Mark(current, f"attempt {current.attempt} of {budget} ended "
                                          "without committing; retry budget spent"))
            continue
        needed.add(current.run_id)
        relaunch_keys[current.run_id].add(key[1])
        why[current.run_id] = verdict.reason if verdict is not None else "it ended"

    covered: set[Key] = set()
    for run_id in sorted(relaunch_keys, key=lambda i: -len(keys_of(views[i]))):
        source = views[run_id]
        free = [p for p in (source.partitions or ("",)) if p in relaunch_keys[run_id]
                and not any((a, p) in blocked or (a, p) in covered for a in source.assets)]
        for part in _contiguous(source.partitions or ("",), free):
            covered.update((a, p) for a in source.assets for p in part)
            end = end_of(source) if source.terminal else End.CRASH
            segment = source.segment + 1 if end == End.SEGMENT else 1
            attempt = source.attempt if end in (End.SEGMENT, End.DUPLICATE) \
                else source.attempt + 1
            out.relaunch.append(Relaunch(source, tuple(p for p in part if p), attempt,
                                         segment, why[run_id]))
    marked = {m.run.run_id for m in out.mark}
    out.settled = sorted(r.run_id for r in views.values() if r.terminal and
                         r.run_id not in needed and r.run_id not in marked)
    return out


def _claim_holder(alive: Sequence[RunView], asset: str) -> RunView:
    """Of several live runs of one partition, the one that holds its claim (the highest
    generation its beats carry; before any claim, the oldest, which came first)."""
    return max(alive, key=lambda r: (r.claim_generation(asset), -r.created_at, r.run_id))


def _dagster_retries(run: RunView, now: float, patience: float, enabled: bool) -> bool:
    """Whether Dagster's run retries may still re-execute ``run``: a failure whose verdict
    says so, or is not written yet, within ``patience`` of its end. A retry is just a live
    run when it comes; when it does not come in time, the sensor relaunches."""
    if not enabled or run.status != "FAILURE" or run.retried_by or run.will_retry is False \
            or run.max_retries == 0:
        return False
    return now - (run.ended_at if run.ended_at is not None else run.created_at) < patience


def _contiguous(order: Sequence[str], chosen: Sequence[str]) -> list[list[str]]:
    """``chosen`` as maximal runs of neighbours in ``order``."""
    wanted, parts, current = set(chosen), [], []
    for p in order:
        if p in wanted:
            current.append(p)
        elif current:
            parts.append(current)
            current = []
    if current:
        parts.append(current)
    return parts
