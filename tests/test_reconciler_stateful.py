"""A model-based test of recovery as reconciliation (issue #24): hypothesis generates
histories of stage runs on a real SQLite Dagster instance, and the real sensor ticks through
them (no daemon: its requests become runs here, deduplicated by run key as Dagster does).

Runs are single or range runs, made by a person or by Dagster's run retries (which come,
come late, or never); they start, beat, freeze, die, are preempted, fail deterministically,
commit partitions, wait for a pool slot; any tag may be overwritten with garbage; the clock
jumps; a tick's requests are dropped; a tick dies between ending runs and deciding; another
run commits a partition. Checked after every tick: no partition has two live runs. Checked
after quiescence (every live process finishes, time passes, ticks until nothing changes):
every wanted partition is committed after its latest wanting run, or given up visibly
(its code raised, a person canceled, the budget is spent); nothing a deterministic failure
wanted was relaunched.
"""

import os
import time
import types
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from dagster._core.events import DagsterEvent, DagsterEventType
from dagster._core.test_utils import create_run_for_test
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from longrun_dagster import sensors
from longrun_dagster import tags as T
from longrun_dagster.recovery import Beat, ProcessIdentity, State

SLOW = os.environ.get("LONGRUN_SLOW") == "1"
STEPS = [0, 0]
"""Rules run and ticks, over all examples (printed by the test)."""
PARTS = ["p0", "p1", "p2", "p3"]
STALL = 100.0
BUDGET = 3
ELSEWHERE = ProcessIdentity("other-host", 4242, "boot-x", "ns-x", "t1")
"""Every worker lives on another host: only its beats tell (no signal reaches it)."""
GARBAGE = ["", "nan", "inf", "-1", "1e999", "x|y|z", "abc@def", "|||||||", "3.5", "99999999"]


@st.composite
def span(draw: Any) -> tuple[int, int]:
    first = draw(st.integers(0, len(PARTS) - 1))
    return first, draw(st.integers(first, len(PARTS) - 1))


@dg.asset(partitions_def=dg.StaticPartitionsDefinition(PARTS),
          backfill_policy=dg.BackfillPolicy.single_run())
def scores() -> None:
    """Stands for a model stage (the sensor reads its partitions definition)."""


SENSOR = sensors.stalled_run_sensor(stall_timeout_seconds=STALL, retry_budget=BUDGET,
                                    kill_grace_seconds=0.0, start_grace_seconds=STALL,
                                    retry_patience_seconds=300.0, slot_wait_seconds=5000.0)
DEFS = dg.Definitions(assets=[scores], sensors=[SENSOR])
KEY = dg.AssetKey("scores")


@dataclass
class Sim:
    """What the model knows of one run's worker."""

    parts: list[str]
    proc: str = "none"  # none (not started), alive, frozen, dead
    at: int = 0  # index of the partition it works on
    deterministic: bool = False
    beats: bool = True
    created_by: str = "person"
    skew: float = 0.0
    """Its host's clock, against the sensor's."""
    retry_due: bool = False
    """Dagster decided to retry it when it failed (the retry may come even after the
    sensor relaunched it: its verdict was written first)."""


class Reconciler(RuleBasedStateMachine):
    runs = Bundle("runs")

    def __init__(self) -> None:
        super().__init__()
        self.home = Path(os.environ["LONGRUN_RECONCILER_TMP"]) / uuid.uuid4().hex
        self.offset = 0.0
        self.cursor: str | None = None
        self.sim: dict[str, Sim] = {}
        self.instance: dg.DagsterInstance | None = None

    @initialize(retries=st.booleans())
    def setup(self, retries: bool) -> None:
        self.home.mkdir(parents=True)
        (self.home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n" + (
            "run_retries:\n  enabled: true\n  max_retries: 1\n" if retries else ""))
        self.instance = dg.DagsterInstance.from_config(str(self.home))
        self.retries = retries
        self.instance.event_log_storage.set_concurrency_slots("gpu", 0)

    @invariant()
    def count(self) -> None:  # runs after every step
        STEPS[0] += 1

    def now(self) -> float:
        return time.time() + self.offset

    @property
    def inst(self) -> dg.DagsterInstance:
        assert self.instance is not None
        return self.instance

    def run(self, run_id: str) -> dg.DagsterRun:
        run = self.inst.get_run_by_id(run_id)
        assert run is not None
        return run

    # -- runs --------------------------------------------------------------------------------

    def _create(self, parts: list[str], tags: dict[str, str], by: str,
                parent: str | None = None) -> str:
        base = {T.STAGE_RUN: "true", **tags}
        if len(parts) == 1 and sensors.RANGE_START_TAG not in base:
            base["dagster/partition"] = parts[0]
        else:
            base.pop("dagster/partition", None)
            base[sensors.RANGE_START_TAG], base[sensors.RANGE_END_TAG] = parts[0], parts[-1]
        run = create_run_for_test(self.inst, job_name="__ASSET_JOB",
                                  status=dg.DagsterRunStatus.NOT_STARTED, tags=base,
                                  asset_selection={KEY}, parent_run_id=parent,
                                  root_run_id=parent)
        self.sim[run.run_id] = Sim(parts, created_by=by)
        return run.run_id

    @rule(target=runs, where=span())
    def person_launches(self, where: tuple[int, int]) -> str:
        first, last = where
        parts = PARTS[first:last + 1]
        tags = {sensors.RANGE_START_TAG: parts[0], sensors.RANGE_END_TAG: parts[-1]} \
            if first != last else {}
        return self._create(parts, tags, "person")

    @rule(run_id=runs, waits=st.booleans(), skew=st.sampled_from([0.0, -3.0, 40.0, -40.0]))
    def start(self, run_id: str, waits: bool, skew: float = 0.0) -> None:
        s = self.sim[run_id]
        s.skew = skew
        if s.proc != "none" or self.run(run_id).status != dg.DagsterRunStatus.NOT_STARTED:
            return
        self.inst.report_dagster_event(DagsterEvent(
            DagsterEventType.RUN_START.value, job_name="__ASSET_JOB"), run_id)
        s.proc = "alive"
        if waits:  # its step waits for the gpu slot (0 slots): no beat while it waits
            s.beats = False
            self.inst.event_log_storage.claim_concurrency_slot("gpu", run_id, "scores")
        else:
            self._beat(run_id, State.WORKING)

    def _beat(self, run_id: str, state: State) -> None:
        s = self.sim[run_id]
        beat = Beat(self.now() + s.skew, s.at, len(s.parts), ELSEWHERE, state, 1)
        self.inst.add_run_tags(run_id, {T.heartbeat_key("scores"): T.mark(run_id, beat.encode()),
                                        T.RUN_ID: run_id})

    @rule(run_id=runs)
    def beat(self, run_id: str) -> None:
        if self.sim[run_id].proc == "alive" and self.sim[run_id].beats and \
                self.run(run_id).status == dg.DagsterRunStatus.STARTED:
            self._beat(run_id, State.WORKING)

    @rule(run_id=runs)
    def commits_a_partition(self, run_id: str) -> None:
        s = self.sim[run_id]
        run = self.run(run_id)
        if s.proc != "alive" or not s.beats or run.status != dg.DagsterRunStatus.STARTED:
            return
        self.inst.report_runless_asset_event(dg.AssetMaterialization(
            asset_key=KEY, partition=s.parts[s.at]))
        s.at += 1
        if s.at == len(s.parts):
            self._beat(run_id, State.ENDED)
            self.inst.report_dagster_event(DagsterEvent(
                DagsterEventType.RUN_SUCCESS.value, job_name="__ASSET_JOB"), run_id)
            s.proc = "none"
        else:
            self._beat(run_id, State.WORKING)

    @rule(run_id=runs, how=st.sampled_from(["freeze", "kill", "kill_reported", "preempt",
                                             "raise", "cancel"]))
    def fault(self, run_id: str, how: str) -> None:
        s = self.sim[run_id]
        run = self.run(run_id)
        if run.status not in (dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.NOT_STARTED):
            return
        if how == "cancel":  # a person cancels it from the UI
            self.inst.report_run_canceling(run)
            self.inst.report_run_canceled(run)
            s.proc = "dead"
            return
        if run.status != dg.DagsterRunStatus.STARTED or s.proc != "alive":
            return
        if how == "freeze":
            s.proc = "frozen"
            return
        s.proc = "dead"
        if how == "kill":
            return  # the node is gone: the run stays STARTED
        if how == "preempt":
            self._beat(run_id, State.PREEMPTED)
        if how == "raise":
            s.deterministic = True
            self._beat(run_id, State.FAILED)
        self._fail(run)

    def _fail(self, run: dg.DagsterRun) -> None:
        self.inst.report_run_failed(run)
        if self.retries and run.tags.get(T.MAX_RETRIES) != "0" and \
                run.tags.get(T.WILL_RETRY) is None and not run.parent_run_id:
            self.inst.add_run_tags(run.run_id, {T.WILL_RETRY: "true"})
            self.sim[run.run_id].retry_due = True

    @rule(run_id=runs, late=st.booleans())
    def dagster_retry_comes(self, run_id: str, late: bool) -> None:
        run = self.run(run_id)
        if run.status != dg.DagsterRunStatus.FAILURE or not self.sim[run_id].retry_due \
                or T.AUTO_RETRY_RUN_ID in run.tags:
            return
        if late:
            self.offset += 400.0  # after the sensor's patience
        tags = {k: v for k, v in run.tags.items() if not k.startswith("dagster/")}
        child = self._create(self.sim[run_id].parts, {**tags, T.WILL_RETRY: "false"},
                             "dagster", parent=run_id)
        self.inst.add_run_tags(run_id, {T.AUTO_RETRY_RUN_ID: child})

    @rule(run_id=runs, tag=st.sampled_from([T.heartbeat_key("scores"), T.ATTEMPT, T.STALLED,
                                            T.WILL_RETRY, T.SEGMENT, T.ENDING, T.MAX_RETRIES,
                                            T.HEARTBEAT]),
          value=st.sampled_from(GARBAGE), owned=st.booleans())
    def garbage_tag(self, run_id: str, tag: str, value: str, owned: bool) -> None:
        self.inst.add_run_tags(run_id, {tag: T.mark(run_id, value) if owned else value})

    @rule(part=st.sampled_from(PARTS))
    def committed_elsewhere(self, part: str) -> None:
        self.inst.report_runless_asset_event(dg.AssetMaterialization(asset_key=KEY,
                                                                     partition=part))

    @rule(seconds=st.sampled_from([1.0, 30.0, 150.0, 400.0, 4000.0, 90000.0]))
    def clock_moves(self, seconds: float) -> None:
        self.offset += seconds

    @rule(drop=st.booleans(), die=st.booleans())
    def tick(self, drop: bool, die: bool) -> None:
        STEPS[1] += 1
        clock = types.SimpleNamespace(time=self.now, sleep=time.sleep)
        real_time, real_reconcile = sensors.time, sensors.reconcile
        sensors.time = clock  # type: ignore[assignment]
        if die:  # the tick's process dies after ending runs, before deciding anything
            def died(*args: Any, **kwargs: Any) -> Any:
                raise SystemExit("tick died")
            sensors.reconcile = died  # type: ignore[assignment]
        try:
            context = dg.build_sensor_context(instance=self.inst, cursor=self.cursor,
                                              definitions=DEFS)
            out = list(SENSOR(context))  # type: ignore[call-overload]
            self.cursor = context.cursor
        except SystemExit:
            return
        finally:
            sensors.time, sensors.reconcile = real_time, real_reconcile
        for request in out:
            if isinstance(request, dg.RunRequest) and not drop:
                self._launch(request)
        self.one_live_run_per_partition()

    def _launch(self, request: dg.RunRequest) -> None:
        key = request.run_key or ""
        if self.inst.get_runs(filters=dg.RunsFilter(tags={"dagster/run_key": key})):
            return  # Dagster deduplicates a repeated run key
        tags = dict(request.tags)
        if request.partition_key:
            parts = [request.partition_key]
        else:
            first = PARTS.index(tags[sensors.RANGE_START_TAG])
            parts = PARTS[first:PARTS.index(tags[sensors.RANGE_END_TAG]) + 1]
        source = tags[T.RELAUNCHED_FROM]
        assert not self.sim[source].deterministic, "a deterministic failure was relaunched"
        self._create(parts, {**tags, "dagster/run_key": key}, "sensor")

    # -- invariants --------------------------------------------------------------------------

    def live_by_key(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {p: [] for p in PARTS}
        for run in self.inst.get_runs(filters=dg.RunsFilter(statuses=list(sensors.LIVE))):
            for p in self.sim[run.run_id].parts:
                out[p].append(run.run_id)
        return out

    def one_live_run_per_partition(self) -> None:
        """After a whole tick (and its requests launched): at most one live run wants each
        partition. Duplicates a person or a late retry made are ended by the tick."""
        for p, live in self.live_by_key().items():
            assert len(live) <= 1, f"{p} has {len(live)} live runs after a tick: {live}"

    def teardown(self) -> None:
        if self.instance is None:
            return
        try:
            self.quiesce()
        finally:
            self.inst.dispose()

    def quiesce(self) -> None:
        """Every live process finishes, time passes, and ticks go on until two rounds in a
        row change nothing (no run live, no run added)."""
        calm = 0
        for _ in range(60):
            before = len(self.inst.get_runs())
            for run in self.inst.get_runs(filters=dg.RunsFilter(statuses=list(sensors.LIVE))):
                s = self.sim[run.run_id]
                if s.proc == "none" and run.status == dg.DagsterRunStatus.NOT_STARTED:
                    self.start(run.run_id, waits=False)
                if s.proc == "alive" and not s.beats:  # its slot comes
                    self.inst.event_log_storage.free_concurrency_slots_for_run(run.run_id)
                    s.beats = True
                    self._beat(run.run_id, State.WORKING)
                while s.proc == "alive" and self.run(run.run_id).status == \
                        dg.DagsterRunStatus.STARTED:
                    self.commits_a_partition(run.run_id)
            self.offset += 1000.0
            self.tick(drop=False, die=False)
            live = self.inst.get_runs(filters=dg.RunsFilter(statuses=list(sensors.LIVE)))
            calm = calm + 1 if not live and len(self.inst.get_runs()) == before else 0
            if calm == 2:
                break
        else:
            raise AssertionError("no quiescence after 60 rounds")
        self.check_every_wanted_partition()

    def check_every_wanted_partition(self) -> None:
        runs = self.inst.get_runs()
        wanted: dict[str, list[dg.DagsterRun]] = {}
        for run in runs:
            for p in self.sim[run.run_id].parts:
                wanted.setdefault(p, []).append(run)
        for p, wanting in wanted.items():
            records = self.inst.fetch_materializations(dg.AssetRecordsFilter(
                asset_key=KEY, asset_partitions=[p]), limit=1000).records
            current = max(wanting, key=lambda r: self.created(r))
            if any(r.timestamp > self.created(current) for r in records):
                continue
            own = T.own(current.tags, current.run_id, current.parent_run_id)
            assert T.GAVE_UP in own, (
                f"{p} wanted by {current.run_id} ({current.status}) is neither committed "
                f"nor given up; tags {dict(current.tags)}")

    def created(self, run: dg.DagsterRun) -> float:
        records = self.inst.get_run_records(filters=dg.RunsFilter(run_ids=[run.run_id]))
        return records[0].create_timestamp.timestamp()


@pytest.mark.timeout(3 * 3600 if SLOW else 300)
def test_every_wanted_partition_ends_committed_or_given_up(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """Generated histories of runs, faults, garbage tags, clock jumps, dropped and dying
    ticks: after quiescence every wanted partition is committed or given up visibly, and
    the sensor never relaunches beside a live run."""
    monkeypatch.setenv("LONGRUN_RECONCILER_TMP", str(tmp_path))
    run_state_machine_as_test(Reconciler, settings=settings(
        max_examples=250 if SLOW else 50, stateful_step_count=40 if SLOW else 25,
        deadline=None, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
    print(f"reconciler model: {STEPS[0]} steps, {STEPS[1]} ticks")
