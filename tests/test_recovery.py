"""Recovery as reconciliation (issues #13 and #24): the heartbeat codec and process
identity, how a run ended, and each reported defect of the event-driven sensor, reproduced
against the sensor's shell on a real SQLite instance with real processes. The generated
histories are in ``test_reconciler_stateful.py``; a real daemon in ``test_stalled_e2e.py``."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import types
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import dagster as dg
import psutil
import pytest
from dagster._core.events import DagsterEvent, DagsterEventType
from dagster._core.test_utils import create_run_for_test

from longrun_dagster import sensors
from longrun_dagster import tags as T
from longrun_dagster.errors import Preempted, StorageError
from longrun_dagster.heartbeat import EXIT_SUPERSEDED, Watchdog, current_process
from longrun_dagster.recovery import (
    Beat,
    End,
    ProcessIdentity,
    RunView,
    State,
    Timing,
    end_of,
    judge,
)
from longrun_dagster.resources import Heartbeat, stop_state
from longrun_dagster.sensors import process_alive_here, stalled_run_sensor

ELSEWHERE = ProcessIdentity("elsewhere", 7, "boot-x", "ns-x", "t1")


def test_the_heartbeat_codec_round_trips_and_reads_no_garbage() -> None:
    me = current_process()
    assert me.started.startswith("t"), "start ticks since boot, never wall-clock time"
    beat = Beat(1234.5, 3, 20, me, State.PREEMPTED, 4)
    assert Beat.decode(beat.encode()) == beat
    old = Beat.decode("1000.000|3/20|4242|host|ended|b|n|1700000000.123")
    assert old is not None and old.ended and old.process is not None
    assert process_alive_here(old.process) is None, "a wall-clock identity is never trusted"
    for garbage in ["", "nan", "inf|1/2", "x|y|z", "abc@def", None, "1e999|3/4"]:
        assert Beat.decode(garbage) is None, garbage


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait(10)


def test_a_process_is_named_by_its_whole_identity(sleeper: subprocess.Popen[bytes]) -> None:
    """The sensor named a process by pid and hostname: a reproduction killed an unrelated
    process that had reused the pid; containers on the host network share a hostname."""
    real = current_process(sleeper.pid)
    assert process_alive_here(real) is True
    reused = dataclasses.replace(real, started="t1")  # same pid, another process
    assert process_alive_here(reused) is False
    assert process_alive_here(dataclasses.replace(real, pid_ns="pid:[1]")) is None
    assert process_alive_here(dataclasses.replace(real, boot_id="another-kernel")) is None
    sleeper.kill()
    sleeper.wait(10)
    assert process_alive_here(real) is False


def test_10_a_wall_clock_step_does_not_make_a_live_stage_gone(
        sleeper: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """psutil's create_time moves with btime: shifting the boot time by 1 s made every
    local stage "gone", and a live stage with a fresh beat was failed and relaunched."""
    real = current_process(sleeper.pid)
    boot = psutil.boot_time()
    monkeypatch.setattr(psutil, "boot_time", lambda: boot + 1.0)
    monkeypatch.setattr(psutil._pslinux, "boot_time", lambda: boot + 1.0, raising=False)
    assert process_alive_here(real) is True


def view(**kw: Any) -> RunView:
    base: dict[str, Any] = dict(status="STARTED", created_at=900.0, started_at=1000.0,
                                assets=("scores",), partitions=("p",))
    return RunView("r", **{**base, **kw})


def gone(process: ProcessIdentity | None) -> bool | None:
    return False if process is not None and process.pid == 666 else None


def test_3_each_stage_step_is_judged_by_its_own_beat() -> None:
    """Multiprocess executor: ``slow`` was SIGKILLed right after ``fast`` wrote ``ended``;
    the one run-wide beat said ended, so the crash was not a crash."""
    fast = Beat(1990.0, 9, 9, ProcessIdentity("h", 665, "b", "n", "t1"), State.ENDED)
    slow = Beat(1990.0, 2, 9, ProcessIdentity("h", 666, "b", "n", "t1"))
    running = view(beats={"fast": fast, "slow": slow})
    verdict = judge(running, 2000.0, Timing(stall_timeout=300), gone)
    assert verdict.stalled and "slow" in verdict.reason
    failed = dataclasses.replace(running, status="FAILURE")
    assert end_of(failed) is End.CRASH


def test_4_a_preempted_stage_is_never_ended() -> None:
    """Heartbeat.on_end marked a SIGTERM-preempted stage ``ended``: the failure read as
    "code raised" and the partition was never relaunched."""
    assert stop_state(Preempted("SIGTERM")) is State.PREEMPTED
    assert stop_state(KeyboardInterrupt()) is State.PREEMPTED
    assert stop_state(StorageError("s3 503")) is State.ERROR
    assert stop_state(ValueError("bug in fn")) is State.FAILED
    assert stop_state(None) is State.ENDED
    beat = Beat(1000.0, 3, 9, None, State.PREEMPTED)
    assert end_of(view(status="FAILURE", beats={"scores": beat})) is End.CRASH
    raised = Beat(1000.0, 3, 9, None, State.FAILED)
    assert end_of(view(status="FAILURE", beats={"scores": raised})) is End.FAILED


def test_a_run_a_person_cancels_is_never_relaunched_even_when_it_stalls() -> None:
    canceling = view(status="CANCELING", beats={"scores": Beat(1000.0, 3, 9, None)})
    verdict = judge(canceling, 5000.0, Timing(stall_timeout=300), gone)
    assert verdict.stalled and verdict.reason.startswith("canceled by a person")
    ended = dataclasses.replace(canceling, status="CANCELED", ending=verdict.reason)
    assert end_of(ended) is End.CANCELED
    assert end_of(dataclasses.replace(ended, ending="no progress for 900s")) is End.CRASH


def test_a_run_frozen_after_its_stage_ended_is_a_stall() -> None:
    ended = view(beats={"scores": Beat(1000.0, 9, 9, None, State.ENDED)})
    timing = Timing(stall_timeout=300)
    assert judge(ended, 2000.0, timing, gone, step_over=lambda r: False).stalled
    assert judge(ended, 2000.0, timing, gone, step_over=lambda r: True).live
    assert judge(ended, 1100.0, timing, gone, step_over=lambda r: False).live


def test_9_a_run_waiting_for_its_pool_slot_is_live() -> None:
    """A relaunch waiting for the gpu slot (no beat while it waits, or only the beat of a
    stage that ended) was ended as stalled, again and again."""
    timing = Timing(stall_timeout=300, start_grace=60)
    for beats in ({}, {"normalized": Beat(1000.0, 9, 9, None, State.ENDED)}):
        run = view(beats=beats)
        assert judge(run, 5000.0, timing, gone, waiting_since=100.0,
                     step_over=lambda r: False).live
    bounded = dataclasses.replace(timing, slot_wait=3600.0)
    assert judge(view(), 5000.0, bounded, gone, waiting_since=100.0).stalled


def test_the_watchdog_exits_when_its_work_is_no_longer_its_own() -> None:
    """On another host the launcher's terminate never reaches the step process: a frozen
    node that woke up went on computing (and tried to commit) for a run already relaunched."""
    exits: list[int] = []
    reasons: list[str] = []
    answer: list[str | None] = [None]
    dog = Watchdog(lambda at, c: None, interval=0.05, stall_timeout=60,
                   check=lambda: answer[0], on_superseded=reasons.append, exit=exits.append)
    dog.start()
    time.sleep(0.3)
    assert exits == []
    answer[0] = "another attempt claimed its partition"
    deadline = time.monotonic() + 5
    while not exits and time.monotonic() < deadline:
        time.sleep(0.05)
    dog.stop()
    assert exits == [EXIT_SUPERSEDED] and reasons == ["another attempt claimed its partition"]


# -- the sensor's shell, against a real instance --------------------------------------------

def make_instance(home: Path, retries: bool) -> dg.DagsterInstance:
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n" + (
        "run_retries:\n  enabled: true\n  max_retries: 1\n" if retries else ""))
    return dg.DagsterInstance.from_config(str(home))


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[dg.DagsterInstance]:
    with make_instance(tmp_path / "home", retries=False) as inst:
        yield inst


@pytest.fixture
def retrying(tmp_path: Path) -> Iterator[dg.DagsterInstance]:
    """An instance with Dagster's run retries on (as deploy/dagster.yaml)."""
    with make_instance(tmp_path / "home", retries=True) as inst:
        yield inst


DAYS = dg.StaticPartitionsDefinition(["d1", "d2", "d3", "d4", "d5"])


@dg.asset(partitions_def=DAYS, backfill_policy=dg.BackfillPolicy.single_run())
def scores() -> None:
    """Stands for a model stage (the sensor reads its partitions)."""


def stage_run(instance: dg.DagsterInstance, status: dg.DagsterRunStatus, beat: Beat | None,
              partition: str = "p", step: str = "scores", **tags: str) -> dg.DagsterRun:
    where = {sensors.RANGE_START_TAG: partition.split("...")[0],
             sensors.RANGE_END_TAG: partition.split("...")[1]} if "..." in partition \
        else {"dagster/partition": partition}
    run = create_run_for_test(instance, job_name="stage_job", status=status, tags={
        T.STAGE_RUN: "true", T.ASSETS: "scores", **where, **tags})
    if beat is not None:
        instance.add_run_tags(run.run_id, {
            T.heartbeat_key(step): T.mark(run.run_id, beat.encode()), T.RUN_ID: run.run_id})
    return run


def tick(instance: dg.DagsterInstance, sensor: dg.SensorDefinition, cursor: str | None = None,
         at: float | None = None) -> tuple[list[dg.RunRequest], str | None]:
    """One evaluation, at wall-clock time ``at`` (the sensor's clock moved) or now."""
    context = dg.build_sensor_context(instance=instance, cursor=cursor,
                                      definitions=dg.Definitions(assets=[scores],
                                                                 sensors=[sensor]))
    real = sensors.time
    if at is not None:
        offset = at - time.time()
        sensors.time = types.SimpleNamespace(  # type: ignore[assignment]
            time=lambda: time.time() + offset, sleep=time.sleep)
    try:
        out = list(sensor(context))  # type: ignore[call-overload]
    finally:
        sensors.time = real  # type: ignore[assignment]
    return [r for r in out if isinstance(r, dg.RunRequest)], context.cursor


def launch(instance: dg.DagsterInstance, request: dg.RunRequest) -> dg.DagsterRun:
    """What the daemon does with a request: a run with its tags, waiting to start."""
    where = {"dagster/partition": request.partition_key} if request.partition_key else {}
    return create_run_for_test(
        instance, job_name="stage_job", status=dg.DagsterRunStatus.NOT_STARTED,
        asset_selection=set(request.asset_selection or ()),
        tags={**request.tags, **where, "dagster/run_key": request.run_key or ""})


def own(instance: dg.DagsterInstance, run_id: str) -> Any:
    run = instance.get_run_by_id(run_id)
    assert run is not None
    return T.own(run.tags, run.run_id, run.parent_run_id)


def key(run: dg.DagsterRun, parts: str = "p..p") -> str:
    return f"longrun-{run.run_id}-{parts}"


def stale() -> Beat:
    return Beat(time.time() - 100, 1, 9, ELSEWHERE)


def fail(instance: dg.DagsterInstance, run: dg.DagsterRun, **tags: str) -> None:
    instance.report_run_failed(run)
    if tags:
        instance.add_run_tags(run.run_id, tags)


def test_the_sensor_never_signals_a_process_that_reused_the_pid(
        instance: dg.DagsterInstance, sleeper: subprocess.Popen[bytes]) -> None:
    impostor = dataclasses.replace(current_process(sleeper.pid), started="t1")
    sleeper.send_signal(signal.SIGSTOP)  # stopped: the sensor would SIGKILL it at once
    run = stage_run(instance, dg.DagsterRunStatus.STARTED, Beat(time.time() - 100, 1, 9,
                                                                 impostor))
    requests, _ = tick(instance, stalled_run_sensor(stall_timeout_seconds=10,
                                                    kill_grace_seconds=0.5))
    assert [r.run_key for r in requests] == [key(run)]
    assert sleeper.poll() is None, "an unrelated process that reused the pid was killed"
    ended = instance.get_run_by_id(run.run_id)
    assert ended is not None and ended.status == dg.DagsterRunStatus.FAILURE
    assert ended.tags[T.MAX_RETRIES] == "0", "Dagster must not re-execute it as well"


def test_the_sensor_kills_its_own_frozen_process_and_frees_its_slot(
        instance: dg.DagsterInstance, sleeper: subprocess.Popen[bytes]) -> None:
    """A cancelled run kept its gpu pool slot (its step never ended); a manual rerun waited
    forever at the GPU stage."""
    sleeper.send_signal(signal.SIGSTOP)
    run = stage_run(instance, dg.DagsterRunStatus.STARTED,
                    Beat(time.time() - 100, 1, 9, current_process(sleeper.pid)))
    storage = instance.event_log_storage
    storage.set_concurrency_slots("gpu", 1)
    assert storage.claim_concurrency_slot("gpu", run.run_id, "scores").is_claimed
    requests, _ = tick(instance, stalled_run_sensor(stall_timeout_seconds=10,
                                                    kill_grace_seconds=0.5))
    assert len(requests) == 1
    assert sleeper.wait(10) == -signal.SIGKILL
    assert storage.claim_concurrency_slot("gpu", "manual-rerun", "scores").is_claimed


def test_1_two_stalled_runs_of_one_partition_get_one_relaunch(
        instance: dg.DagsterInstance) -> None:
    """Both decided LEAVE: each saw the other in the live list read at the start of the
    tick, although the same tick had just ended it."""
    first = stage_run(instance, dg.DagsterRunStatus.STARTED, stale())
    second = stage_run(instance, dg.DagsterRunStatus.STARTED, stale())
    sensor = stalled_run_sensor(stall_timeout_seconds=10, kill_grace_seconds=0.0)
    requests, cursor = tick(instance, sensor)
    assert len(requests) == 1 and requests[0].run_key in (key(first), key(second))
    again, _ = tick(instance, sensor, cursor)
    assert [r.run_key for r in again] == [requests[0].run_key], "the same one, until launched"


def test_2_a_run_ended_by_a_tick_that_died_is_relaunched_by_the_next(
        instance: dg.DagsterInstance) -> None:
    """The tick's process died between the terminate and the decision: the run ended
    CANCELED and later ticks read only running and FAILURE runs."""
    run = stage_run(instance, dg.DagsterRunStatus.STARTED, stale())
    instance.add_run_tags(run.run_id, {T.ENDING: T.mark(run.run_id, "no progress"),
                                       T.RUN_ID: run.run_id})
    instance.report_run_canceling(run)
    instance.report_run_canceled(run)
    requests, _ = tick(instance, stalled_run_sensor(stall_timeout_seconds=10))
    assert [r.run_key for r in requests] == [key(run)]
    person = stage_run(instance, dg.DagsterRunStatus.STARTED, stale(), partition="q")
    instance.report_run_canceled(person)  # a person canceled it: not relaunched, visibly
    requests, _ = tick(instance, stalled_run_sensor(stall_timeout_seconds=10))
    assert [r.run_key for r in requests] == [key(run)]
    assert "canceled" in own(instance, person.run_id)[T.GAVE_UP]


def test_4_a_preempted_run_is_relaunched_with_retries_off(
        instance: dg.DagsterInstance) -> None:
    preempted = stage_run(instance, dg.DagsterRunStatus.STARTED,
                          Beat(time.time(), 3, 9, ELSEWHERE, State.PREEMPTED))
    fail(instance, preempted)
    raised = stage_run(instance, dg.DagsterRunStatus.STARTED,
                       Beat(time.time(), 3, 9, ELSEWHERE, State.FAILED), partition="q")
    fail(instance, raised)
    requests, _ = tick(instance, stalled_run_sensor(stall_timeout_seconds=10))
    assert [r.run_key for r in requests] == [key(preempted)]
    assert "code raised" in own(instance, raised.run_id)[T.GAVE_UP]


def test_5_a_range_run_is_judged_by_each_of_its_partitions(
        instance: dg.DagsterInstance) -> None:
    """The scheduled run of d5 committed it while the range d1..d5 stalled in d3: judged
    by its last partition, the range was left and d3, d4 never computed."""
    stage_run(instance, dg.DagsterRunStatus.STARTED, stale(), partition="d1...d5")
    for day in ("d1", "d2", "d5"):
        instance.report_runless_asset_event(dg.AssetMaterialization("scores", partition=day))
    requests, _ = tick(instance, stalled_run_sensor(stall_timeout_seconds=10,
                                                    kill_grace_seconds=0.0))
    assert [(r.tags[sensors.RANGE_START_TAG], r.tags[sensors.RANGE_END_TAG])
            for r in requests] == [("d3", "d4")]


def test_5_a_stalled_day_inside_a_live_range_is_left_to_the_range(
        instance: dg.DagsterInstance) -> None:
    """"Already working on this partition" compared the string d1...d5 with d3: a stalled
    d3 inside a live range was relaunched beside it (two live runs)."""
    stage_run(instance, dg.DagsterRunStatus.STARTED, Beat(time.time(), 1, 9, ELSEWHERE),
              partition="d1...d5")
    day = stage_run(instance, dg.DagsterRunStatus.STARTED, stale(), partition="d3")
    requests, _ = tick(instance, stalled_run_sensor(stall_timeout_seconds=10,
                                                    kill_grace_seconds=0.0))
    assert requests == []
    ended = instance.get_run_by_id(day.run_id)
    assert ended is not None and ended.is_finished


def test_6_a_relaunch_is_requested_until_it_exists_however_long_that_takes(
        instance: dg.DagsterInstance) -> None:
    """Decisions were acted on for one hour: a relaunch whose requests never reached the
    daemon was dropped after an hour."""
    run = stage_run(instance, dg.DagsterRunStatus.STARTED, stale())
    sensor = stalled_run_sensor(stall_timeout_seconds=10, kill_grace_seconds=0.0)
    requests, cursor = tick(instance, sensor)
    later, cursor = tick(instance, sensor, cursor, at=time.time() + 3 * 86400)
    assert [r.run_key for r in later] == [r.run_key for r in requests] == [key(run)]
    launch(instance, later[0])
    assert tick(instance, sensor, cursor, at=time.time() + 3 * 86400)[0] == []


def test_6_11_dagsters_retry_is_waited_for_then_relaunched_whatever_its_verdict(
        retrying: dg.DagsterInstance) -> None:
    """A run left to Dagster's retry was never relaunched when the patience was an hour
    or more; a continuation read a missing will_retry as "won't retry" (two runs)."""
    sensor = stalled_run_sensor(stall_timeout_seconds=10, retry_patience_seconds=7200)
    crashed = stage_run(retrying, dg.DagsterRunStatus.STARTED, stale())
    fail(retrying, crashed, **{T.WILL_RETRY: "true"})
    segment = stage_run(retrying, dg.DagsterRunStatus.FAILURE,  # verdict not written yet
                        Beat(time.time(), 3, 9, ELSEWHERE, State.PREEMPTED), partition="q")
    retrying.add_run_tags(segment.run_id, {T.CONTINUATION: T.mark(segment.run_id, "requested"),
                                           T.RUN_ID: segment.run_id})
    segment_run = retrying.get_run_by_id(segment.run_id)
    assert segment_run is not None and T.WILL_RETRY not in segment_run.tags
    assert tick(retrying, sensor)[0] == [], "Dagster's retry may still come"
    requests, _ = tick(retrying, sensor, at=time.time() + 7300)
    assert sorted(r.run_key or "" for r in requests) == sorted([key(crashed),
                                                                key(segment, "q..q")])
    continued = next(r for r in requests if r.run_key == key(segment, "q..q"))
    assert continued.tags[T.SEGMENT] == "2" and continued.tags[T.ATTEMPT] == "1"
    assert own(retrying, crashed.run_id)[T.MAX_RETRIES] == "0"


def test_7_a_failure_timed_by_a_clock_behind_the_daemons_is_read(
        instance: dg.DagsterInstance) -> None:
    """The cursor paged on update_timestamp, taken by the worker's clock: a failure from a
    worker 3 s behind the daemon was never read."""
    sensor = stalled_run_sensor(stall_timeout_seconds=10)
    run = stage_run(instance, dg.DagsterRunStatus.STARTED, Beat(time.time(), 3, 9, ELSEWHERE))
    requests, cursor = tick(instance, sensor)
    assert requests == []
    instance.report_dagster_event(DagsterEvent(DagsterEventType.RUN_FAILURE.value,
                                               job_name="stage_job"),
                                  run.run_id, timestamp=time.time() - 3.0)
    requests, _ = tick(instance, sensor, cursor)
    assert [r.run_key for r in requests] == [key(run)]
    assert "t" not in json.loads(cursor or "{}"), "no cursor over time"


@pytest.mark.parametrize("tag", [T.heartbeat_key("scores"), T.HEARTBEAT, T.STALLED, T.ATTEMPT,
                                 T.SEGMENT, T.WILL_RETRY, T.ENDING, T.SELECTION])
def test_8_a_malformed_tag_reads_as_no_tag_and_stops_nothing(
        instance: dg.DagsterInstance, tag: str) -> None:
    """float() and int() were called unguarded: one malformed tag made every tick raise,
    and a stalled run beside it stayed STARTED."""
    for i, garbage in enumerate(["nan", "x|y", "1e999", "", "-3", "a@b@c"]):
        broken = stage_run(instance, dg.DagsterRunStatus.STARTED, stale(), partition=f"q{i}")
        instance.add_run_tags(broken.run_id, {tag: T.mark(broken.run_id, garbage)
                                              if i % 2 else garbage})
    beside = stage_run(instance, dg.DagsterRunStatus.STARTED, stale())
    requests, _ = tick(instance, stalled_run_sensor(stall_timeout_seconds=10,
                                                    kill_grace_seconds=0.0))
    assert key(beside) in [r.run_key for r in requests]


def test_9_a_relaunch_waiting_for_the_gpu_slot_is_not_ended(
        instance: dg.DagsterInstance) -> None:
    storage = instance.event_log_storage
    storage.set_concurrency_slots("gpu", 1)
    holder = stage_run(instance, dg.DagsterRunStatus.STARTED,
                       Beat(time.time(), 3, 9, ELSEWHERE), partition="q")
    assert storage.claim_concurrency_slot("gpu", holder.run_id, "scores").is_claimed
    waiting = stage_run(instance, dg.DagsterRunStatus.STARTED,
                        Beat(time.time() - 500, 9, 9, ELSEWHERE, State.ENDED),
                        step="normalized")
    assert not storage.claim_concurrency_slot("gpu", waiting.run_id, "scores").is_claimed
    requests, _ = tick(instance, stalled_run_sensor(stall_timeout_seconds=10,
                                                    start_grace_seconds=10))
    assert requests == []
    still = instance.get_run_by_id(waiting.run_id)
    assert still is not None and still.status == dg.DagsterRunStatus.STARTED


class _Blip:
    """A run database that cannot be reached (the first ``fails`` calls)."""

    def __init__(self, fails: int) -> None:
        self.fails, self.tags = fails, []

    def add_run_tags(self, run_id: str, tags: dict[str, str]) -> None:
        if self.fails:
            self.fails -= 1
            raise ConnectionError("could not connect to server")
        self.tags.append(tags)

    def get_run_by_id(self, run_id: str) -> Any:
        raise ConnectionError("could not connect to server")


def _stage_run(still_holds: Any = None) -> Any:
    from longrun_dagster.batches import Progress, StageRun
    return StageRun("scores[p]", Progress(batches_total=9, rows_total=90),
                    log=types.SimpleNamespace(error=print), asset="scores",
                    still_holds=still_holds, generation=3)


def test_12_13_a_database_blip_neither_fails_a_stage_nor_hides_its_lost_claim() -> None:
    """A transient error in the first heartbeat write failed the stage; a zombie whose run
    database was unreachable never checked its claim."""
    # watchdog off: its own check would exit this (pytest's) process once the claim is lost
    beat = Heartbeat(interval_seconds=0.05, stall_timeout_seconds=60, watchdog=False)
    beat._instance, beat._run_id = _Blip(fails=1), "r"
    claimed = [True]
    run = _stage_run(still_holds=lambda: claimed[0])
    beat.on_prepare(run)  # the first write fails: retried, never raised
    try:
        deadline = time.monotonic() + 5
        while not beat._instance.tags and time.monotonic() < deadline:
            time.sleep(0.05)
        assert beat._instance.tags, "the beat was never published after the blip"
        decoded = Beat.decode(beat._instance.tags[-1][T.heartbeat_key("scores")].split("@")[1])
        assert decoded is not None and decoded.generation == 3
        claimed[0] = False
        assert beat._superseded(run) == "another attempt claimed its partition"
    finally:
        beat._dog.stop()


def test_a_relaunch_selects_what_the_run_planned_downstream_included(tmp_path: Path) -> None:
    """A schedule's run has no asset selection: the relaunch selected only the stages
    (['embeddings', 'normalized'] of a job that also had quality and daily_summary)."""
    from longrun_dagster import AtomicObjectStoreIOManager
    from tests.helpers import pipeline

    stage = pipeline.make_scores(hook_resource_keys=["heartbeat"])

    @dg.asset(partitions_def=stage.partitions_def, deps=[stage])
    def summary() -> None:
        raise RuntimeError("stands in for the process dying after the stage")

    job = dg.define_asset_job("nightly", selection=["texts", "scores", "summary"])
    defs = dg.Definitions(assets=[pipeline.texts, stage, summary], jobs=[job], resources={
        "io_manager": AtomicObjectStoreIOManager(base_uri=(tmp_path / "lr").as_uri()),
        "heartbeat": Heartbeat(interval_seconds=60, watchdog=False)})
    with dg.DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def("nightly").execute_in_process(
            partition_key="2024-01-01", instance=instance, raise_on_error=False)
        run = instance.get_run_by_id(result.run_id)
        assert run is not None and not run.asset_selection
        beat = Beat(time.time() - 100, 1, 9, None)  # killed mid-stage: not "ended"
        instance.add_run_tags(run.run_id, {T.heartbeat_key("scores"): T.mark(
            run.run_id, beat.encode()), T.RUN_ID: run.run_id, "team": "search"})
        requests, _ = tick(instance, stalled_run_sensor(stall_timeout_seconds=10))
    [request] = requests
    assert sorted(k.to_user_string() for k in request.asset_selection or []) == [
        "scores", "summary", "texts"]
    assert request.partition_key == "2024-01-01" and request.tags["team"] == "search"


def test_the_sensor_ends_a_run_frozen_after_its_stage_ended(
        instance: dg.DagsterInstance) -> None:
    run = stage_run(instance, dg.DagsterRunStatus.STARTED,
                    Beat(time.time() - 100, 9, 9, ELSEWHERE, State.ENDED))
    requests, _ = tick(instance, stalled_run_sensor(stall_timeout_seconds=10,
                                                    kill_grace_seconds=0.5))
    assert [r.run_key for r in requests] == [key(run)]
    ended = instance.get_run_by_id(run.run_id)
    assert ended is not None and ended.is_finished


def test_a_relaunch_whose_launch_the_daemon_never_finished_is_relaunched(
        instance: dg.DagsterInstance) -> None:
    """Celery soak, seed 1851834193: the daemon was killed after it marked the sensor's
    relaunch STARTING and before the launcher started its worker."""
    run = stage_run(instance, dg.DagsterRunStatus.STARTED, stale())
    sensor = stalled_run_sensor(stall_timeout_seconds=1.0, kill_grace_seconds=0.5,
                                start_grace_seconds=1.0)
    [request], _ = tick(instance, sensor)
    assert request.run_key == key(run) and request.tags[T.STAGE_RUN] == "true"
    relaunch = launch(instance, request)  # waits (for a run slot): a waiting run is live
    time.sleep(1.5)
    assert tick(instance, sensor)[0] == []
    instance.report_dagster_event(DagsterEvent(
        event_type_value=DagsterEventType.PIPELINE_STARTING.value, job_name="stage_job"),
        run_id=relaunch.run_id)
    assert tick(instance, sensor)[0] == [], "it only just went STARTING"
    time.sleep(1.5)
    [again], _ = tick(instance, sensor)
    assert again.run_key == key(relaunch)
    assert again.tags[T.ATTEMPT] == "3" and again.partition_key == "p"
    stuck = instance.get_run_by_id(relaunch.run_id)
    assert stuck is not None and stuck.is_finished


SUPERSEDED_STAGE = """
import sys
import dagster as dg
from longrun_dagster import AtomicObjectStoreIOManager, Heartbeat
from tests.helpers import pipeline

stage = pipeline.make_scores(hook_resource_keys=["heartbeat"])
dg.materialize([pipeline.texts, stage], selection=[stage], partition_key=sys.argv[2],
               resources={"io_manager": AtomicObjectStoreIOManager(base_uri=sys.argv[1]),
                          "heartbeat": Heartbeat(interval_seconds=0.2,
                                                 stall_timeout_seconds=600)})
print("RESULT committed", flush=True)
"""


def test_the_watchdog_ends_a_stage_whose_partition_another_attempt_claimed(
        tmp_path: Path) -> None:
    """A step on another host (a frozen node that woke up, a Celery worker the launcher's
    terminate never reaches) went on computing for a partition a relaunch had claimed."""
    from longrun_dagster import AtomicObjectStoreIOManager
    from longrun_dagster.commit import PartitionStore
    from longrun_dagster.storage import LocalStore
    from tests.helpers import pipeline

    root = Path(__file__).parent.parent
    base = (tmp_path / "lr").as_uri()
    day = "2024-01-03"
    assert dg.materialize([pipeline.texts], partition_key=day, resources={
        "io_manager": AtomicObjectStoreIOManager(base_uri=base)}).success
    env = {**os.environ, "PYTHONPATH": str(root), "ANNOUNCE_BATCHES": "1",
           "BATCH_SLEEP": "0.3"}
    store = PartitionStore(LocalStore(str(tmp_path / "lr")))
    with subprocess.Popen([sys.executable, "-c", SUPERSEDED_STAGE, base, day], cwd=root,
                          text=True, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("BATCH 1"):
                break
        else:
            raise AssertionError(f"the stage never ran a batch (exit {proc.wait()})")
        assert store.begin(["scores"], day, run_id="relaunch").claim()
        out = proc.stdout.read()
        assert proc.wait(60) == EXIT_SUPERSEDED, out[-2000:]
    assert "another attempt claimed its partition" in out and "RESULT" not in out
    assert store.lookup(["scores"], day) is None, "the superseded attempt committed"


def test_a_stalled_run_whose_event_log_is_locked_is_still_ended_and_relaunched(
        instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite, a stage SIGSTOPped mid-write: its run's event log stayed locked, reading
    what the run planned raised "database is locked", the run was skipped every tick
    ("0 wanted partitions"), so nobody killed the process that held the lock (seen in
    CI, test_frozen_or_killed_run_is_relaunched_by_the_sensor[SIGSTOP])."""
    import sqlite3

    frozen = stage_run(instance, dg.DagsterRunStatus.STARTED, stale())
    real = instance.get_records_for_run

    def locked(run_id: str, *args: Any, **kwargs: Any) -> Any:
        if run_id == frozen.run_id:
            raise sqlite3.OperationalError("database is locked")
        return real(run_id, *args, **kwargs)

    monkeypatch.setattr(instance, "get_records_for_run", locked)
    requests, _ = tick(instance, stalled_run_sensor(stall_timeout_seconds=10,
                                                    kill_grace_seconds=0.0))
    assert [r.run_key for r in requests] == [key(frozen)]
    assert own(instance, frozen.run_id).get(T.ENDING)


def test_a_frozen_process_holding_the_run_database_is_killed_though_no_tag_can_be_written(
        instance: dg.DagsterInstance, sleeper: subprocess.Popen[bytes],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite, a stage SIGSTOPped in the middle of a write to the run database: it holds
    the lock, so the sensor's first act on the stalled run, writing why it ends it
    (``longrun/ending``), raised "database is locked"; the sensor then never signalled the
    process that held the lock, and the run stayed STARTED for ever (seen:
    test_frozen_or_killed_run_is_relaunched_by_the_sensor[SIGSTOP-False] beside two CI
    runs). A frozen process of its own is killed anyway; the next tick ends the run."""
    import sqlite3

    sleeper.send_signal(signal.SIGSTOP)
    run = stage_run(instance, dg.DagsterRunStatus.STARTED,
                    Beat(time.time() - 100, 1, 9, current_process(sleeper.pid)))
    real = instance.add_run_tags

    def locked(run_id: str, new_tags: Mapping[str, str]) -> None:
        if run_id == run.run_id and T.ENDING in new_tags:
            raise sqlite3.OperationalError("database is locked")
        real(run_id, new_tags)

    monkeypatch.setattr(instance, "add_run_tags", locked)
    sensor = stalled_run_sensor(stall_timeout_seconds=10, kill_grace_seconds=0.5)
    tick(instance, sensor)
    assert sleeper.wait(10) == -signal.SIGKILL, "the frozen process was left holding the lock"
    monkeypatch.setattr(instance, "add_run_tags", real)  # the lock went with the process
    requests, _ = tick(instance, sensor)
    assert [r.run_key for r in requests] == [key(run)]
