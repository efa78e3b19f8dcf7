"""The Celery deployment shape (deploy/celery/), end to end: redis-server as broker and
result backend, deploy/dagster.yaml on PostgreSQL, moto S3 as the store every process
shares, two Celery workers started by deploy/celery/start-worker.sh (as root each in its
own hostname and PID namespace: separate machines, to the daemon), and a dagster-daemon
with the queued run coordinator running the stalled-run sensor.

Asserted is what users see: committed bytes, run outcomes, step times in the event log.
"""

import datetime as dt
import itertools
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import psutil
import pytest

from tests.conftest import free_port, s3_client, wait_for_port

pytest.importorskip("dagster_celery", reason="needs the celery extra: pip install -e .[celery]")
from tests.helpers import celery_defs, pipeline  # noqa: E402
from tests.helpers.celery_deploy import (  # noqa: E402
    NO_REDIS,
    CeleryDeployment,
    Cluster,
    heartbeat,
    ns_pid_outside,
    redis_server_binary,
)

pytestmark = [pytest.mark.celery, pytest.mark.daemon, pytest.mark.postgres, pytest.mark.s3,
              pytest.mark.timeout(420)]
S = dg.DagsterRunStatus
TERMINAL = (S.SUCCESS, S.FAILURE, S.CANCELED)
_days = (f"{dt.date(2024, 2, 1) + dt.timedelta(days=i)}" for i in itertools.count())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str) -> Iterator[Cluster]:
    """redis-server, the code server, and two workers, node-a and node-b, each serving the
    default queue `dagster` and the `gpu` queue with one slot (one device each)."""
    binary = redis_server_binary()
    if binary is None:
        pytest.skip(NO_REDIS)
    bucket = f"celery-{time.time_ns()}"
    s3_client(s3_endpoint).create_bucket(Bucket=bucket)
    port = free_port()
    nodes = Cluster(tmp_path_factory.mktemp("celery"), redis_binary=binary, port=port,
                    s3_endpoint=s3_endpoint, bucket=bucket)
    try:
        wait_for_port(port)
        nodes.start_code_server(free_port())
        nodes.start_worker("node-a", "dagster", "gpu")
        nodes.start_worker("node-b", "dagster", "gpu")
        wait_for_port(nodes.code_port, timeout=180)
        nodes.wait_ready()
        yield nodes
    finally:
        left = nodes.stop()
    assert not left, f"processes left behind: {left}"


@pytest.fixture
def deploy(cluster: Cluster, tmp_path: Path, postgres_url: str
           ) -> Iterator[Callable[..., CeleryDeployment]]:
    """Starts this test's Dagster (its own database and dagster-daemon) on the cluster,
    replacing first any worker an earlier test lost (it boots while the test begins: a
    step waits in its queue until a worker is ready); stops it after and checks that
    nothing of it was left running."""
    made: list[CeleryDeployment] = []

    def start(**options: Any) -> CeleryDeployment:
        cluster.replace_lost()
        deployment = CeleryDeployment(tmp_path, cluster, postgres_url=postgres_url, **options)
        made.append(deployment)
        deployment.start_daemon()
        return deployment

    yield start
    stopped = [d.stop() for d in made]
    hung = [p for h, _ in stopped for p in h]
    left = [p for _, lf in stopped for p in lf]
    if hung:
        print(f"run workers still running after every run ended (killed): {hung}")
    assert not left, f"processes left behind: {left}"


def commit_upstream(cluster: Cluster, *days: str) -> None:
    """The stage's input, committed to the shared store in-process."""
    resources = celery_defs.resources(cluster.base_uri, cluster.env["LONGRUN_S3_ENDPOINT"])
    for day in days:
        assert dg.materialize([celery_defs.texts], partition_key=day,
                              resources=resources).success


def clean_digest(tmp_path: Path, day: str) -> str:
    """The digest of the stage's output for ``day`` computed in-process, uninterrupted."""
    base = (tmp_path / "clean").as_uri()
    assert dg.materialize([celery_defs.texts, celery_defs.scores], partition_key=day,
                          resources=celery_defs.resources(base, None, watchdog=False)).success
    return pipeline.committed_sha(base, day)


def succeeded(runs: list[dg.DagsterRun]) -> list[dg.DagsterRun]:
    return [r for r in runs if r.status == S.SUCCESS]


def worker_named(cluster: Cluster, node: str | None) -> str:
    names = [n for n in cluster.workers if cluster.node(n) == node]
    assert names, f"step ran on {node!r}, not on a worker of {list(cluster.workers)}"
    return names[0]


def test_a_partition_is_committed_by_a_celery_worker(
    deploy: Callable[..., CeleryDeployment], cluster: Cluster, tmp_path: Path
) -> None:
    d = deploy()
    day = next(_days)
    commit_upstream(cluster, day)
    d.launch(day)
    [run] = d.wait(lambda runs: succeeded(runs), 240, "the run to succeed")
    span = d.step_span(run.run_id)
    worker = worker_named(cluster, span.worker)
    beat = heartbeat(run)
    assert beat is not None and beat.done > 0 and beat.process is not None
    if cluster.namespaces:  # the stage's own word: it ran on that node
        assert beat.process.host == worker
    manifest = d.committed(day)
    assert manifest is not None and manifest.run_id == run.run_id
    assert manifest.object("data").digest == clean_digest(tmp_path, day)
    assert d.materializations(day) == [run.run_id]


def test_b_gpu_steps_of_two_runs_never_overlap_on_a_gpu_worker(
    deploy: Callable[..., CeleryDeployment], cluster: Cluster
) -> None:
    """This instance sets no pool limit: two runs of a GPU stage are admitted only by the
    `gpu` queue their pool routes to. Only node-a's single slot serves it here, and only
    once both steps wait in it, so that they contend."""
    d = deploy()
    days = next(_days), next(_days)
    commit_upstream(cluster, *days)
    nodes = [cluster.node(n) for n in cluster.workers]
    node = cluster.node("node-a")
    cluster.wait_ready()  # a worker still starting would miss the broadcast
    cluster.control("cancel_consumer", queue="gpu", destination=nodes)
    try:
        d.launch(*days)
        d.wait(lambda runs: len(runs) == 2 and all(d.step_span(r.run_id).submitted
                                                   for r in runs),
               240, "both runs to submit their GPU step to Celery")
        cluster.control("add_consumer", queue="gpu", destination=[node])
        runs = d.wait(lambda runs: len(succeeded(runs)) == 2 and runs, 240,
                      "both runs to succeed")
    finally:
        cluster.control("add_consumer", queue="gpu", destination=nodes)
    first, second = sorted((d.step_span(r.run_id) for r in runs),
                           key=lambda s: s.started or 0.0)
    assert first.worker == second.worker == node
    assert first.started and first.ended and second.started and second.ended
    assert second.submitted is not None and second.submitted < first.ended  # contended
    assert first.ended <= second.started, (first, second)
    print(f"GPU steps on {node}: 0.0-{first.ended - first.started:.1f}s and "
          f"{second.started - first.started:.1f}-{second.ended - first.started:.1f}s")


def _stage_in_progress(runs: list[dg.DagsterRun]) -> dg.DagsterRun | None:
    beat = heartbeat(runs[0]) if len(runs) == 1 else None
    return runs[0] if beat is not None and beat.done > 0 else None


def _recovered(d: CeleryDeployment, first: dg.DagsterRun, day: str) -> dg.DagsterRun:
    """A later run commits the partition; then every run ends (none left STARTED or
    CANCELING)."""
    done: dg.DagsterRun = d.wait(
        lambda runs: [r for r in succeeded(runs) if r.run_id != first.run_id],
        240, "a later run to commit the partition")[0]
    d.wait(lambda runs: all(r.status in TERMINAL for r in runs), 150,
           "every run to end (none STARTED or CANCELING)")
    assert len(succeeded(d.runs())) == 1, d.describe()
    manifest = d.committed(day)
    assert manifest is not None and manifest.run_id == done.run_id
    assert d.materializations(day) == [done.run_id], d.describe()  # committed once
    return done


def _seconds_from_last_beat_to_commit(d: CeleryDeployment, first: dg.DagsterRun, day: str
                                      ) -> float:
    fresh = d.instance().get_run_by_id(first.run_id)
    assert fresh is not None
    beat = heartbeat(fresh)
    assert beat is not None
    [record] = d.instance().fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("scores"), asset_partitions=[day]),
        limit=1).records
    return record.timestamp - beat.at


@pytest.mark.parametrize("run_retries", [False, True], ids=["retries_off", "retries_on"])
def test_c_worker_killed_mid_stage_is_recovered_on_the_other_node(
    deploy: Callable[..., CeleryDeployment], cluster: Cluster, tmp_path: Path,
    run_retries: bool
) -> None:
    """kill -9 of the whole worker (a node lost) while the stage runs on it: the run worker
    on the daemon's host is healthy and cannot tell; the stalled-run sensor must end the
    run and get the partition committed by a later run, once, byte-identical."""
    d = deploy(run_retries=run_retries, gpu_pool_limit=1)
    day = next(_days)
    commit_upstream(cluster, day)
    clean = clean_digest(tmp_path, day)
    d.launch(day)
    first = d.wait(_stage_in_progress, 240, "the stage to make progress")
    lost = worker_named(cluster, d.step_span(first.run_id).worker)
    cluster.lose(lost, signal.SIGKILL)
    done = _recovered(d, first, day)
    assert d.step_span(done.run_id).worker != cluster.node(lost)
    assert d.committed(day).object("data").digest == clean
    print(f"worker lost (run retries {'on' if run_retries else 'off'}): committed "
          f"{_seconds_from_last_beat_to_commit(d, first, day):.1f}s after the last heartbeat"
          f" (stall timeout {celery_defs.STALL:.0f}s)\n{d.summary()}")


def test_d_frozen_worker_is_recovered_and_its_zombie_ends_itself(
    deploy: Callable[..., CeleryDeployment], cluster: Cluster, tmp_path: Path
) -> None:
    """SIGSTOP of the whole worker (a frozen node) mid-stage, SIGCONT once the partition was
    committed elsewhere: the woken stage process must exit by itself and commit nothing."""
    d = deploy(gpu_pool_limit=1)
    day = next(_days)
    commit_upstream(cluster, day)
    clean = clean_digest(tmp_path, day)
    d.launch(day)
    first = d.wait(_stage_in_progress, 240, "the stage to make progress")
    frozen = worker_named(cluster, d.step_span(first.run_id).worker)
    beat = heartbeat(first)
    assert beat is not None and beat.process is not None
    pid = beat.process.pid
    tree = cluster.lose(frozen, signal.SIGSTOP)
    stage = ns_pid_outside(tree, pid) if cluster.namespaces else psutil.Process(pid)
    assert stage is not None, f"no process {pid} in {frozen}'s tree"
    done = _recovered(d, first, day)
    seconds = _seconds_from_last_beat_to_commit(d, first, day)
    committed = d.committed(day)
    cluster.workers[frozen].signal(signal.SIGCONT)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and _alive(stage):
        time.sleep(0.5)
    assert not _alive(stage), f"the woken stage process {stage.pid} is still running\n" \
        f"{d.describe()}\n{d.logs()}"
    time.sleep(2.0)  # a zombie that did not end would be committing now
    assert d.committed(day) == committed and committed.object("data").digest == clean
    assert d.materializations(day) == [done.run_id]
    print(f"frozen node: committed {seconds:.1f}s after the last heartbeat; the woken "
          f"stage process ended itself\n{d.summary()}")


def _alive(proc: psutil.Process) -> bool:
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False
