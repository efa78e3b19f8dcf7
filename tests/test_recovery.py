"""Recovery rules that hold wherever a run executes (issue #13): the heartbeat codec and
process identity, crashes under any executor, stalls after ``ended``, one decision per
stall, the relaunch's selection, freed slots, and no skipped failures. Pure decisions are
tested directly; the sensor's shell against a real SQLite instance and real processes."""

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from dagster._core.test_utils import create_run_for_test

from longrun_dagster import tags as T
from longrun_dagster.heartbeat import EXIT_SUPERSEDED, Watchdog, current_process
from longrun_dagster.recovery import (
    Action,
    Beat,
    ProcessIdentity,
    RunView,
    Stalled,
    failure_page,
    find_stalled,
    plan,
    retry_fell_through,
)
from longrun_dagster.sensors import FAILURES_PER_TICK, process_alive_here, stalled_run_sensor


def test_the_heartbeat_codec_round_trips_and_reads_01_beats() -> None:
    """The heartbeat was written in one module and parsed in another; one codec now."""
    me = current_process()
    beat = Beat(1234.5, 3, 20, me, ended=True)
    assert Beat.decode(beat.encode()) == dataclasses.replace(
        beat, process=dataclasses.replace(me, started=round(me.started, 3)))
    old = Beat.decode("1000.000|3/20|4242|host")
    assert old.at == 1000.0 and old.done == 3 and old.total == 20 and not old.ended
    assert old.process == ProcessIdentity("host", 4242)
    assert Beat.decode("1000.000|3/20|4242|host|ended").ended
    assert not old.process.same_kernel_and_namespace(me), "no boot id: never signalled"


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait(10)


def view(process: ProcessIdentity | None, **kw: Any) -> RunView:
    base: dict[str, Any] = dict(status="STARTED", started_at=1000.0, progress_at=1990.0,
                                process=process, partition="p", assets=("scores",))
    return RunView("r", **{**base, **kw})


def test_a_process_is_named_by_its_whole_identity(sleeper: subprocess.Popen[bytes]) -> None:
    """The sensor named a process by pid and hostname: a reproduction killed an unrelated
    process that had reused the pid; containers on the host network share a hostname."""
    real = current_process(sleeper.pid)
    assert process_alive_here(view(real)) is True
    reused = dataclasses.replace(real, started=real.started - 5.0)  # same pid, another process
    assert process_alive_here(view(reused)) is False
    elsewhere = dataclasses.replace(real, pid_ns="pid:[1]")  # a container, same hostname
    assert process_alive_here(view(elsewhere)) is None
    other_boot = dataclasses.replace(real, boot_id="another-kernel")
    assert process_alive_here(view(other_boot)) is None
    sleeper.kill()
    sleeper.wait(10)
    assert process_alive_here(view(real)) is False


def test_a_failed_run_whose_stage_had_not_ended_crashed_under_any_executor() -> None:
    """The multiprocess executor writes STEP_FAILURE for a child killed with kill -9; the
    sensor took that for code that raised, and never relaunched the partition."""
    beat = Beat(1000.0, 2, 20, ProcessIdentity("h", 1)).encode()
    tags = {T.STAGE_RUN: "true", "dagster/partition": "p", T.ASSETS: "scores",
            T.HEARTBEAT: T.mark("r", beat)}
    failed = dg.DagsterRun(job_name="j", run_id="r", tags=tags,
                           status=dg.DagsterRunStatus.FAILURE)
    assert RunView.of(failed, 900.0).crashed
    ended = {**tags, T.HEARTBEAT: T.mark("r", Beat(1000.0, 20, 20, None, ended=True).encode())}
    raised = dg.DagsterRun(job_name="j", run_id="r", tags=ended,
                           status=dg.DagsterRunStatus.FAILURE)
    assert not RunView.of(raised, 900.0).crashed


def test_a_run_frozen_after_its_stage_ended_is_a_stall() -> None:
    """Frozen after the stage's ``ended`` beat, before its commit: the run stayed STARTED,
    held its slot, and was never recovered. Between stages (step finished) it is fine."""
    ended = view(None, stage_ended=True, progress_at=1000.0)
    frozen = find_stalled([ended], now=2000.0, timeout=300, process_alive=lambda r: None,
                          step_over=lambda r: False)
    assert frozen and "never finished" in frozen[0].reason
    assert find_stalled([ended], now=2000.0, timeout=300, process_alive=lambda r: None,
                        step_over=lambda r: True) == []
    assert find_stalled([ended], now=1100.0, timeout=300, process_alive=lambda r: False,
                        step_over=lambda r: False) == []


def test_one_decision_from_the_final_state() -> None:
    """The terminate landed after the failure (FAILURE -> CANCELING -> CANCELED) after the
    sensor left the run to Dagster's retries, which then refused it: nobody relaunched."""
    failed = view(None, status="FAILURE", crashed=True, will_retry=True)
    assert plan(Stalled(failed, "x"), [], False, 3).action is Action.DAGSTER_RETRY
    canceled = dataclasses.replace(failed, status="CANCELED")
    assert plan(Stalled(canceled, "x"), [], False, 3).action is Action.RELAUNCH
    assert retry_fell_through(canceled, now=100.0, decided_at=99.0, patience=300)
    assert not retry_fell_through(failed, now=100.0, decided_at=99.0, patience=300)
    assert retry_fell_through(failed, now=500.0, decided_at=99.0, patience=300)
    retried = dataclasses.replace(canceled, retried_by="child")
    assert not retry_fell_through(retried, now=500.0, decided_at=99.0, patience=300)


def test_a_page_of_failures_skips_nothing_at_its_boundary() -> None:
    updated = [(1.0, "a"), (2.0, "b"), (2.0, "c"), (2.0, "d"), (3.0, "e")]
    seen: list[str] = []
    cursor: tuple[float, list[str]] = (0.0, [])
    for _ in range(4):
        page, cursor = failure_page(
            [u for u in updated if u[0] >= cursor[0]], cursor, limit=2)
        seen += page
    assert seen == ["a", "b", "c", "d", "e"]


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


def stage_run(instance: dg.DagsterInstance, status: dg.DagsterRunStatus, beat: Beat,
              **tags: str) -> dg.DagsterRun:
    run = create_run_for_test(instance, job_name="stage_job", status=status, tags={
        T.STAGE_RUN: "true", T.ASSETS: "scores", "dagster/partition": "p", **tags})
    instance.add_run_tags(run.run_id, {T.HEARTBEAT: T.mark(run.run_id, beat.encode()),
                                       T.RUN_ID: run.run_id})
    return run


def tick(instance: dg.DagsterInstance, sensor: dg.SensorDefinition, cursor: str | None = None
         ) -> tuple[list[dg.RunRequest], str | None]:
    context = dg.build_sensor_context(instance=instance, cursor=cursor)
    out = list(sensor(context))  # type: ignore[call-overload]
    return [r for r in out if isinstance(r, dg.RunRequest)], context.cursor


def own(instance: dg.DagsterInstance, run_id: str) -> Any:
    run = instance.get_run_by_id(run_id)
    assert run is not None
    return T.own(run.tags, run.run_id, run.parent_run_id)


def test_the_sensor_never_signals_a_process_that_reused_the_pid(
        instance: dg.DagsterInstance, sleeper: subprocess.Popen[bytes]) -> None:
    real = current_process(sleeper.pid)
    impostor = dataclasses.replace(real, started=real.started - 5.0)
    sleeper.send_signal(signal.SIGSTOP)  # stopped: the sensor would SIGKILL it at once
    run = stage_run(instance, dg.DagsterRunStatus.STARTED, Beat(time.time() - 100, 1, 9,
                                                                 impostor))
    sensor = stalled_run_sensor(stall_timeout_seconds=10, kill_grace_seconds=0.5)
    requests, _ = tick(instance, sensor)
    assert [r.run_key for r in requests] == [f"relaunch-{run.run_id}"]
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
    sensor = stalled_run_sensor(stall_timeout_seconds=10, kill_grace_seconds=0.5)
    requests, _ = tick(instance, sensor)
    assert len(requests) == 1
    assert sleeper.wait(10) == -signal.SIGKILL
    assert storage.claim_concurrency_slot("gpu", "manual-rerun", "scores").is_claimed


def test_a_run_left_to_dagsters_retries_that_ends_canceled_is_relaunched(
        retrying: dg.DagsterInstance) -> None:
    """FAILURE -> CANCELING -> CANCELED after the decision: Dagster refused its retry
    ("not failed or canceled") and nobody ever relaunched the partition."""
    run = stage_run(retrying, dg.DagsterRunStatus.STARTED,
                    Beat(time.time() - 100, 1, 9, ProcessIdentity("elsewhere", 7)))
    sensor = stalled_run_sensor(stall_timeout_seconds=10, kill_grace_seconds=0.5)
    requests, cursor = tick(retrying, sensor)
    assert requests == [] and own(retrying, run.run_id)[T.HANDLED] == "dagster_retry"
    late = retrying.get_run_by_id(run.run_id)
    assert late is not None
    retrying.report_run_canceling(late)  # the terminate that lands late
    retrying.report_run_canceled(late)
    requests, _ = tick(retrying, sensor, cursor)
    assert [r.run_key for r in requests] == [f"relaunch-{run.run_id}"]
    assert own(retrying, run.run_id)[T.HANDLED] == "relaunch"


def test_more_failures_than_one_tick_reads_are_all_looked_at(
        instance: dg.DagsterInstance) -> None:
    """The sensor read 200 failed runs and jumped its cursor to the newest: the rest were
    never looked at."""
    ids = [stage_run(instance, dg.DagsterRunStatus.FAILURE, Beat(1000.0 + i, 1, 9, None),
                     **{"dagster/partition": f"p{i}"}).run_id
           for i in range(FAILURES_PER_TICK + 10)]
    sensor = stalled_run_sensor(stall_timeout_seconds=10)
    cursor: str | None = '{"t": 0, "seen": []}'
    keys: set[str] = set()
    for _ in range(3):
        requests, cursor = tick(instance, sensor, cursor)
        keys |= {r.run_key or "" for r in requests}
    assert {f"relaunch-{i}" for i in ids} <= keys


def test_a_relaunch_selects_what_the_run_planned_downstream_included(tmp_path: Path) -> None:
    """A schedule's run has no asset selection: the relaunch selected only the stages
    (['embeddings', 'normalized'] of a job that also had quality and daily_summary)."""
    from longrun_dagster import AtomicObjectStoreIOManager, Heartbeat
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
        instance.add_run_tags(run.run_id, {T.HEARTBEAT: T.mark(run.run_id, beat.encode()),
                                           T.RUN_ID: run.run_id, "team": "search"})
        requests, _ = tick(instance, stalled_run_sensor(stall_timeout_seconds=10),
                           '{"t": 0, "seen": []}')
    [request] = requests
    assert sorted(k.to_user_string() for k in request.asset_selection or []) == [
        "scores", "summary", "texts"]
    assert request.partition_key == "2024-01-01" and request.tags["team"] == "search"


def test_the_sensor_ends_a_run_frozen_after_its_stage_ended(
        instance: dg.DagsterInstance) -> None:
    """Frozen after the stage's ``ended`` beat, before its commit: the run stayed STARTED
    and held its slot forever (the sensor took it for a run between stages)."""
    run = stage_run(instance, dg.DagsterRunStatus.STARTED,
                    Beat(time.time() - 100, 9, 9, ProcessIdentity("elsewhere", 7), ended=True))
    sensor = stalled_run_sensor(stall_timeout_seconds=10, kill_grace_seconds=0.5)
    requests, _ = tick(instance, sensor)
    assert [r.run_key for r in requests] == [f"relaunch-{run.run_id}"]
    ended = instance.get_run_by_id(run.run_id)
    assert ended is not None and ended.is_finished


def test_a_relaunch_whose_launch_the_daemon_never_finished_is_relaunched(
        instance: dg.DagsterInstance) -> None:
    """Celery soak, seed 1851834193: the daemon was killed after it marked the sensor's
    relaunch STARTING and before the launcher started its worker. The relaunch carried no
    stage tag, so the sensor never watched it; Dagster's run monitoring failed it 300 s
    later (START_TIMEOUT), unwatched too, and the partition was never committed."""
    from dagster._core.events import DagsterEvent, DagsterEventType

    run = stage_run(instance, dg.DagsterRunStatus.STARTED,
                    Beat(time.time() - 100, 1, 9, ProcessIdentity("elsewhere", 7)))
    sensor = stalled_run_sensor(stall_timeout_seconds=1.0, kill_grace_seconds=0.5,
                                start_grace_seconds=1.0)
    [request], _ = tick(instance, sensor)
    assert request.run_key == f"relaunch-{run.run_id}" and request.tags[T.STAGE_RUN] == "true"
    # the daemon creates the requested run, which waits (for a run slot, longer than the
    # start grace: a waiting run is not stalled) ...
    relaunch = create_run_for_test(
        instance, job_name="stage_job", status=dg.DagsterRunStatus.NOT_STARTED,
        asset_selection=set(request.asset_selection or ()),
        tags={**request.tags, "dagster/partition": request.partition_key or "",
              "dagster/run_key": request.run_key or ""})
    time.sleep(1.5)
    requests, _ = tick(instance, sensor)
    assert [r.run_key for r in requests] == [request.run_key]
    # ... dequeues it and marks it STARTING, and is killed before the launcher starts it
    instance.report_dagster_event(DagsterEvent(
        event_type_value=DagsterEventType.PIPELINE_STARTING.value, job_name="stage_job"),
        run_id=relaunch.run_id)
    requests, _ = tick(instance, sensor)
    assert [r.run_key for r in requests] == [request.run_key], "it only just went STARTING"
    time.sleep(1.5)
    requests, _ = tick(instance, sensor)
    assert sorted(r.run_key or "" for r in requests) == sorted(
        [request.run_key or "", f"relaunch-{relaunch.run_id}"])
    again = next(r for r in requests if r.run_key == f"relaunch-{relaunch.run_id}")
    assert again.tags[T.ATTEMPT] == "3" and again.partition_key == "p"
    stuck = instance.get_run_by_id(relaunch.run_id)
    assert stuck is not None and stuck.status == dg.DagsterRunStatus.FAILURE


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
