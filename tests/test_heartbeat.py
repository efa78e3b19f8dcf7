"""Watchdog, stalled-run decisions (pure), and fencing leases."""

import os
import re
import tempfile
import threading
import time
from typing import Any

from longrun_dagster.heartbeat import EXIT_STALLED, Watchdog
from longrun_dagster.recovery import (
    Beat,
    End,
    ProcessIdentity,
    RunView,
    State,
    Timing,
    end_of,
    judge,
    reconcile,
)


def test_watchdog_publishes_progress_time_not_liveness() -> None:
    """A live thread in a stuck process must still read as stalled: publish progress only."""
    published: list[float] = []
    dog = Watchdog(lambda at, c: published.append(at), interval=0.05, stall_timeout=60,
                   enforce=False)
    dog.start()
    time.sleep(0.3)  # no progress: nothing new published
    assert len(published) == 1
    dog.progress(batches_done=1)
    time.sleep(0.2)
    dog.stop()
    assert len(published) >= 2 and published[-1] > published[0]


def hung_batch(stop: threading.Event) -> None:
    stop.wait(30)  # stands in for a CUDA call that never returns


def test_watchdog_dumps_stacks_and_exits_on_stall() -> None:
    stop = threading.Event()
    worker = threading.Thread(target=hung_batch, args=(stop,), name="model-loop")
    worker.start()
    stalls: list[tuple[str, float]] = []
    exits: list[int] = []
    done = threading.Event()

    def exit_(code: int) -> None:
        exits.append(code)
        done.set()

    dog = Watchdog(lambda at, c: None, interval=0.05, stall_timeout=0.3,
                   on_stall=lambda stacks, silent: stalls.append((stacks, silent)), exit=exit_)
    dog.start()
    assert done.wait(5)
    stop.set()
    worker.join()
    assert exits == [EXIT_STALLED]
    stacks, silent = stalls[0]
    assert silent > 0.3 and "hung_batch" in stacks and "model-loop" in stacks


def view(run_id: str, **kw: Any) -> RunView:
    base: dict[str, Any] = dict(status="STARTED", created_at=900.0, started_at=1000.0,
                                partitions=("2024-01-01",), assets=("scores",))
    base.update(kw)
    return RunView(run_id, **base)


def beat(at: float, process: ProcessIdentity | None = None, state: State = State.WORKING
         ) -> dict[str, Beat]:
    return {"scores": Beat(at, 1, 9, process, state)}


def unknown(process: ProcessIdentity | None) -> bool | None:
    return None


def test_judge_uses_last_progress_then_start_time() -> None:
    timing = Timing(stall_timeout=300, start_grace=30)
    runs = [view("fresh", beats=beat(1950.0)), view("silent", beats=beat(1500.0)),
            view("never", started_at=1100.0), view("done", status="SUCCESS")]
    stalled = [r.run_id for r in runs if judge(r, 2000.0, timing, unknown).stalled]
    assert stalled == ["silent", "never"]
    assert "no progress for 500s" in judge(runs[1], 2000.0, timing, unknown).reason


def test_a_dead_process_is_stalled_at_once() -> None:
    killed = view("killed", beats=beat(1999.0, ProcessIdentity("h", 4242)))
    verdict = judge(killed, 2000.0, Timing(stall_timeout=300), lambda p: False)
    assert verdict.stalled and "(4242 on h) is gone" in verdict.reason


def reconcile_one(runs: list[RunView], budget: int = 3, satisfied: bool = False) -> Any:
    timing = Timing(stall_timeout=300)
    verdicts = {r.run_id: judge(r, 2000.0, timing, unknown) for r in runs}
    return reconcile(runs, verdicts, lambda a, p, t: satisfied, now=2000.0, budget=budget,
                     retry_patience=300, retries_enabled=False)


def test_reconcile_relaunches_within_budget_never_beside_a_live_run_never_committed() -> None:
    crashed = view("a", status="FAILURE", beats=beat(1000.0))
    [relaunch] = reconcile_one([crashed]).relaunch
    assert relaunch.attempt == 2 and relaunch.partitions == ("2024-01-01",)
    assert reconcile_one([crashed], satisfied=True).relaunch == []
    live = view("b", created_at=950.0, beats=beat(1990.0))
    assert reconcile_one([crashed, live]).relaunch == []
    last = view("c", status="FAILURE", attempt=3, beats=beat(1000.0))
    result = reconcile_one([last])
    assert result.relaunch == [] and "retry budget" in result.mark[0].why


def test_a_failed_publish_is_retried_and_does_not_stop_the_watchdog() -> None:
    """A locked instance DB once must not silence the heartbeat (the sensor would then kill
    a healthy run)."""
    calls: list[float] = []

    def flaky(at: float, counters: dict[str, Any]) -> None:
        calls.append(at)
        if len(calls) == 2:
            raise RuntimeError("database is locked")

    dog = Watchdog(flaky, interval=0.05, stall_timeout=60, enforce=False)
    dog.start()
    dog.progress(batches_done=1)
    time.sleep(0.4)
    dog.stop()
    assert dog.failed_publishes == 1 and dog.published >= 2
    assert calls[2] == calls[1], "the failed publish must be retried with the same progress"


def test_a_run_between_stages_is_not_stalled() -> None:
    """Under the multiprocess executor a stage step's process exits when the step is done
    while its run goes on (the next stage waiting for the gpu pool, or a plain asset): the
    sensor read the exited pid in the heartbeat as a dead run, failed the healthy run and
    relaunched it (seen in a backfill of the example through dagster-webserver)."""
    import dataclasses

    import dagster as dg

    from longrun_dagster import AtomicObjectStoreIOManager, Heartbeat
    from tests.helpers import pipeline

    stage = pipeline.make_scores(hook_resource_keys=["heartbeat"])
    with tempfile.TemporaryDirectory() as tmp, dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize(
            [pipeline.texts, stage], partition_key="2024-01-01", instance=instance,
            resources={"io_manager": AtomicObjectStoreIOManager(base_uri=tmp),
                       "heartbeat": Heartbeat(interval_seconds=60, watchdog=False)})
        assert result.success
        run = instance.get_run_by_id(result.run_id)
    assert run is not None
    ended = RunView.of(run, created_at=900.0, started_at=1000.0)
    [(step, last)] = ended.beats.items()
    assert step == "scores" and last.ended and last.process is not None
    assert last.process.pid == os.getpid()
    timing = Timing(stall_timeout=300)
    running = dataclasses.replace(ended, status="STARTED",
                                  beats={step: dataclasses.replace(last, at=1999.0)})
    assert judge(running, 2000.0, timing, lambda p: False).live
    mid_stage = dataclasses.replace(running, beats={step: dataclasses.replace(
        last, at=1999.0, state=State.WORKING)})  # a step killed mid-stage
    assert judge(mid_stage, 2000.0, timing, lambda p: False).stalled
    crashed = dataclasses.replace(mid_stage, status="FAILURE")
    assert end_of(crashed) is End.CRASH


def test_a_stage_is_watched_while_its_model_loads() -> None:
    """The model load (``setup``) ran before the heartbeat started: in a run of two stages
    the second stage's load ran under the first stage's last beat, which says "ended", so
    a hang there was invisible to the sensor and to the watchdog. A load that fails must
    still stop the watchdog thread."""
    import threading

    import dagster as dg
    import pandera.pandas as pa

    from longrun_dagster import AtomicObjectStoreIOManager, Heartbeat, model_stage
    from longrun_dagster.tags import HEARTBEAT_ENDED, heartbeat_key, own
    from tests.helpers import pipeline

    first = pipeline.make_scores(hook_resource_keys=["heartbeat"])
    beats_during_load: list[str] = []
    fail_load = threading.Event()

    with tempfile.TemporaryDirectory() as tmp, dg.DagsterInstance.ephemeral() as instance:
        def load(stage: Any) -> None:
            run = instance.get_run_by_id(stage.run_id)
            assert run is not None
            beats_during_load.append(own(run.tags, run.run_id, None).get(
                heartbeat_key("second"), ""))
            if fail_load.is_set():
                raise RuntimeError("injected: the model does not load")

        second = model_stage(
            upstream=first, schema=pa.DataFrameSchema({"id": pa.Column(str),
                                                       "score": pa.Column(float)}),
            partitions_def=pipeline.DAYS, batch_size=50, setup=load, name="second",
            hook_resource_keys=["heartbeat"],
        )(lambda batch, stage: batch[["id", "score"]])
        resources = {"io_manager": AtomicObjectStoreIOManager(base_uri=tmp),
                     "heartbeat": Heartbeat(interval_seconds=60, watchdog=False)}
        loaded_at = time.time()
        assert dg.materialize([pipeline.texts, first, second], partition_key="2024-01-01",
                              instance=instance, resources=resources).success
        [beat] = beats_during_load
        at, _, pid, _, *state = beat.split("|")
        assert float(at) >= loaded_at and int(pid) == os.getpid()
        assert HEARTBEAT_ENDED not in state, f"the load ran under an ended beat: {beat}"

        fail_load.set()
        failed = dg.materialize([pipeline.texts, first, second], partition_key="2024-01-02",
                                instance=instance, resources=resources, raise_on_error=False)
        assert not failed.success
    assert not [t for t in threading.enumerate() if t.name == "longrun-watchdog"]


def test_a_re_execution_does_not_inherit_its_parents_stall() -> None:
    """Dagster copies a run's tags to its re-executions (run retries, "re-execute from
    failure"): the retry of a stalled run read as stalled (its parent's watchdog tag, the
    sensor's decision, a dead pid), so it was killed or never watched."""
    import dagster as dg

    from longrun_dagster import tags as T

    parent_tags = {T.STAGE_RUN: "true", T.ASSETS: "scores", "dagster/partition": "p",
                   T.HEARTBEAT: "1000.0|3/20|999999|host", T.STALLED: "1100.0",
                   T.ENDING: "no progress", T.RUN_ID: "parent"}
    parent = dg.DagsterRun(job_name="j", run_id="parent", tags=parent_tags)
    retry = dg.DagsterRun(job_name="j", run_id="retry", tags=parent_tags,
                          parent_run_id="parent", root_run_id="parent",
                          status=dg.DagsterRunStatus.STARTED)
    view_parent = RunView.of(parent, created_at=900.0)
    view_retry = RunView.of(retry, created_at=1900.0, started_at=1900.0)
    assert view_parent.ending == "no progress" and view_parent.stalled_at == 1100.0
    assert view_retry.ending is None and view_retry.stalled_at is None
    assert view_retry.beats == {}
    assert view_retry.assets == ("scores",) and view_retry.partition == "p"
    assert judge(view_retry, 2000.0, Timing(stall_timeout=300), unknown).live


def test_a_retrys_first_heartbeat_does_not_adopt_its_parents_stall_or_decision() -> None:
    """A re-execution inherited its parent's stall tag and the sensor's decision; its first
    heartbeat wrote longrun/run_id=<its id>, after which every inherited tag counted as its
    own."""
    import dagster as dg

    from longrun_dagster import tags as T

    parent_tags = {T.STAGE_RUN: "true", T.ASSETS: "scores", "dagster/partition": "p",
                   T.heartbeat_key("scores"): T.mark("parent", "1000.0|3/20|999999|host"),
                   T.STALLED: T.mark("parent", "1100.0"),
                   T.ENDING: T.mark("parent", "no progress"), T.RUN_ID: "parent"}
    first_beat = {T.heartbeat_key("scores"): T.mark("retry", "1950.0|0/20|4242|host"),
                  T.RUN_ID: "retry"}
    retry = dg.DagsterRun(job_name="j", run_id="retry", tags={**parent_tags, **first_beat},
                          parent_run_id="parent", root_run_id="parent",
                          status=dg.DagsterRunStatus.STARTED)
    view = RunView.of(retry, created_at=1900.0, started_at=1900.0)
    assert view.stalled_at is None and view.ending is None
    assert view.beats["scores"].at == 1950.0
    timing = Timing(stall_timeout=300)
    assert judge(view, 1960.0, timing, unknown).live
    assert judge(view, 2300.0, timing, unknown).stalled, "a retry that stalls is recovered"


def test_a_run_still_starting_gets_the_start_grace() -> None:
    """Under a CPU hog a re-executed run took longer than a short stall timeout to start its
    step; counted from its start with no heartbeat yet, it read as stalled and was killed."""
    starting = view("starting", started_at=1000.0)
    timing = Timing(stall_timeout=4, start_grace=30)
    assert judge(starting, 1010.0, timing, unknown).live
    assert judge(starting, 1031.0, timing, unknown).stalled


def test_a_running_stage_shows_its_progress_in_a_run_tag() -> None:
    """Dagster has no progress widget (dagster#3071): the runs list shows the
    `longrun/progress` tag, refreshed with each heartbeat, and the last one says ended."""
    import dagster as dg

    from longrun_dagster import AtomicObjectStoreIOManager, Heartbeat, model_stage
    from longrun_dagster.tags import PROGRESS
    from tests.helpers import pipeline

    seen: list[str] = []
    with tempfile.TemporaryDirectory() as tmp, dg.DagsterInstance.ephemeral() as instance:
        def score(batch: Any, stage: Any) -> Any:
            if stage.batch_index == 10:  # half way: what the runs list shows now
                time.sleep(0.3)  # a heartbeat interval
                run = instance.get_run_by_id(stage.run_id)
                assert run is not None
                seen.append(run.tags.get(PROGRESS, ""))
            return pipeline.score_batch(batch, stage)

        stage = model_stage(upstream=pipeline.texts, schema=pipeline.Scored,
                            partitions_def=pipeline.DAYS, batch_size=10, name="scores",
                            setup=pipeline.load_model,
                            hook_resource_keys=["heartbeat"])(score)
        result = dg.materialize([pipeline.texts, stage], partition_key="2024-01-03",
                                instance=instance, resources={
                                    "io_manager": AtomicObjectStoreIOManager(base_uri=tmp),
                                    "heartbeat": Heartbeat(interval_seconds=0.1,
                                                           watchdog=False)})
        assert result.success
        final = instance.get_run_by_id(result.run_id)
        assert final is not None
        last = final.tags[PROGRESS]
    [during] = seen
    assert re.fullmatch(r"scores\[2024-01-03\]: (4[05]|50)% (80|90|100)/200 rows, "
                        r"ETA (\d+s|\d+m)", during), during
    assert last == "scores[2024-01-03]: 100% 200/200 rows, ended"
