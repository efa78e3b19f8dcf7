"""The Celery deployment shape as processes, for tests/test_celery.py: Debian's
redis-server (broker and result backend), deploy/dagster.yaml on PostgreSQL, moto S3 as the
object store every process shares, Celery workers started by deploy/celery/start-worker.sh
(each in its own hostname and PID namespace when root, like separate machines) and a
dagster-daemon with the queued run coordinator, all on loopback.

The code server (`dagster api grpc`, which starts the run workers) and the workers serve the
whole module; each test gets its own PostgreSQL database, DAGSTER_HOME and dagster-daemon.
Every process starts in a session of its own; ``stop`` kills each session and then any
descendant that left it, so a test leaves nothing running.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import psutil
import yaml

from longrun_dagster import tags as T
from longrun_dagster.recovery import Beat

ROOT = Path(__file__).parent.parent.parent
BIN = Path(sys.executable).parent
NO_REDIS = ("redis-server not found; install Debian's redis-server "
            "or run ./scripts/test as root")
STAGE = "scores"
LOCATION = "celery_test"


def redis_server_binary() -> str | None:
    return shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server") if os.path.exists(p)),
        None)


def can_unshare() -> bool:
    """Whether workers can get their own hostname and PID namespace (root, unshare);
    LONGRUN_CELERY_PLAIN=1 starts them as plain processes all the same."""
    if os.geteuid() != 0 or shutil.which("unshare") is None \
            or os.environ.get("LONGRUN_CELERY_PLAIN") == "1":
        return False
    done = subprocess.run(["unshare", "--uts", "--pid", "--fork", "--mount-proc", "true"],
                          capture_output=True, timeout=30)
    return done.returncode == 0


class Group:
    """A process started in a session of its own; stopped as a whole."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.log = name, log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.seen: set[psutil.Process] = set()

    def tree(self) -> list[psutil.Process]:
        """The process and its descendants now (remembered, for the final sweep)."""
        try:
            top = psutil.Process(self.proc.pid)
            found = [top, *top.children(recursive=True)]
        except psutil.NoSuchProcess:
            found = []
        self.seen.update(found)
        return found

    def signal(self, sig: int) -> None:
        """``sig`` to the whole session (the process group) and every descendant."""
        procs = self.tree()
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        for proc in procs:
            try:
                proc.send_signal(sig)
            except psutil.NoSuchProcess:
                pass

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(15)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and self.leftovers():
            for proc in self.leftovers():
                try:
                    proc.kill()
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.2)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL to whatever is left of the tree."""
        if self.proc.poll() is None:
            self.tree()
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def leftovers(self) -> list[psutil.Process]:
        alive = []
        for proc in self.seen:
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.NoSuchProcess:
                pass
        return alive

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


class Redis(Group):
    """redis-server on a free loopback port, nothing persisted."""

    def __init__(self, binary: str, port: int, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        super().__init__("redis", [binary, "--port", str(port), "--bind", "127.0.0.1",
                                   "--save", "", "--appendonly", "no", "--dir", str(folder)],
                         dict(os.environ), folder / "redis.log")
        self.port = port

    def url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"


def instance_yaml(*, postgres_url: str, run_retries: bool, gpu_pool_limit: int | None,
                  max_retries: int = 1) -> str:
    """deploy/dagster.yaml with test-sized intervals, run retries on or off (``max_retries``
    by default; a run's `dagster/max_retries` tag overrides it), and the gpu pool's slots
    (None: unlimited, so only the Celery queue admits GPU steps). The database URL is
    written in: the instance ref that runs hand to the shared workers carries it."""
    config = yaml.safe_load((ROOT / "deploy" / "dagster.yaml").read_text())
    config["storage"]["postgres"]["postgres_url"] = postgres_url
    config["run_coordinator"]["config"] = {"dequeue_interval_seconds": 1}
    config["run_monitoring"].update(poll_interval_seconds=3, cancel_timeout_seconds=5,
                                    free_slots_after_run_end_seconds=5)
    config["run_retries"].update(enabled=run_retries, max_retries=max_retries)
    if gpu_pool_limit is None:
        config["concurrency"].pop("pools", None)
    else:
        config["concurrency"]["pools"] = {"default_limit": gpu_pool_limit}
    return str(yaml.safe_dump(config, sort_keys=False))


@dataclass(frozen=True)
class StepSpan:
    """Where and when a run's stage step ran, from the run's event log."""

    run_id: str
    worker: str | None
    submitted: float | None
    started: float | None
    ended: float | None


class Cluster:
    """What outlives one test: redis-server, the Celery workers (each a "node") and the
    code server (`dagster api grpc`) of the test code location, which launches the run
    workers; with the environment every process of the code location gets."""

    def __init__(self, tmp: Path, *, redis_binary: str, port: int, s3_endpoint: str,
                 bucket: str) -> None:
        self.tmp = tmp
        self.redis = Redis(redis_binary, port, tmp / "redis")
        self.base_uri = f"s3://{bucket}/lr"
        self.namespaces = can_unshare()
        home = tmp / "worker-home"  # dagster-celery keeps the worker config it writes here
        home.mkdir()
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        with dg.DagsterInstance.from_config(str(home)) as instance:  # its SQLite schema,
            instance.get_runs(limit=1)  # before processes race to create it (corrupts it)
        self.env = {
            **os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": str(ROOT),
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "DAGSTER_CELERY_BROKER": self.redis.url(0),
            "DAGSTER_CELERY_BACKEND": self.redis.url(1),
            "LONGRUN_BASE_URI": self.base_uri, "LONGRUN_S3_ENDPOINT": s3_endpoint,
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "STALL_TIMEOUT": "6", "BATCH_SLEEP": "0.2",
            "CLOCK_OFFSET_FILE": str(tmp / "sensor-clock-offset"),
        }
        self.workers: dict[str, Group] = {}
        self.queues: dict[str, tuple[str, ...]] = {}
        self.lost: set[str] = set()
        self.code_port = 0
        self.code_server: Group | None = None

    def start_code_server(self, port: int) -> None:
        self.code_port = port
        self.code_server = Group("code-server", [
            sys.executable, "-m", "dagster", "api", "grpc", "-m", "tests.helpers.celery_defs",
            "-d", str(ROOT), "-h", "127.0.0.1", "-p", str(port),
            "--location-name", LOCATION], self.env, self.tmp / "code-server.log")

    def run_workers(self) -> list[psutil.Process]:
        """The run worker processes the code server started (multiprocessing children)."""
        found = []
        for proc in self.code_server.tree()[1:] if self.code_server else []:
            try:
                if "resource_tracker" not in " ".join(proc.cmdline()):
                    found.append(proc)
            except psutil.NoSuchProcess:
                pass
        return found

    def start_worker(self, name: str, *queues: str) -> None:
        """deploy/celery/start-worker.sh NAME QUEUE..., one slot; as root in its own UTS
        and PID namespace with hostname ``name`` (a separate machine, to the sensor)."""
        script = [str(ROOT / "deploy" / "celery" / "start-worker.sh"), name, *queues]
        argv = (["unshare", "--uts", "--pid", "--fork", "--mount-proc", "sh", "-c",
                 'hostname "$0" && exec "$@"', name, *script] if self.namespaces else script)
        log = self.tmp / f"worker-{name}-{len(self.workers)}-{time.time():.0f}.log"
        self.workers[name] = Group(name, argv, {
            **self.env, "LONGRUN_CELERY_CONCURRENCY": "1",
            "LONGRUN_CELERY_PRELOAD": "tests.helpers.celery_defs"}, log)
        self.queues[name] = queues
        self.lost.discard(name)

    def node(self, name: str) -> str:
        """The worker's Celery node name, as its step events report it."""
        return f"{name}@{name if self.namespaces else socket.gethostname()}"

    def wait_ready(self, timeout: float = 180) -> None:
        """Until every worker says it is ready (Celery logs "<node> ready.")."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            if all(f"{self.node(n)} ready." in w.log_tail(200_000)
                   for n, w in self.workers.items()):
                return
            time.sleep(0.5)
        raise AssertionError(f"workers not ready after {timeout:.0f}s\n{self.logs()}")

    def replace_lost(self) -> None:
        """Start a replacement for every worker a test lost (a new node of that name)."""
        for name in sorted(self.lost):
            self.replace(name)

    def replace(self, name: str) -> None:
        """The node's processes killed (woken first if frozen) and a new node of that name
        started in their place."""
        self.workers[name].signal(signal.SIGCONT)
        self.workers[name].kill()
        self.start_worker(name, *self.queues[name])

    def lose(self, name: str, sig: int = signal.SIGKILL) -> list[psutil.Process]:
        """``sig`` to a worker's whole process tree (a node lost or frozen); returns the
        tree as it was."""
        self.lost.add(name)
        group = self.workers[name]
        tree = group.tree()
        group.signal(sig)
        return tree

    def check_alive(self) -> None:
        for name, group in self.workers.items():
            if group.proc.poll() is not None and name not in self.lost:
                raise AssertionError(f"worker {name} exited with {group.proc.returncode}\n"
                                     f"{self.logs()}")
        if self.code_server is not None and self.code_server.proc.poll() is not None:
            raise AssertionError(f"the code server exited with "
                                 f"{self.code_server.proc.returncode}\n"
                                 f"{self.code_server.log_tail()}")

    def control(self, command: str, **arguments: Any) -> Any:
        """A Celery remote-control command to the workers, through the broker."""
        from celery import Celery

        app = Celery(broker=self.env["DAGSTER_CELERY_BROKER"])
        try:
            return app.control.broadcast(command, arguments=arguments, reply=True,
                                         timeout=10, destination=arguments.pop(
                                             "destination", None))
        finally:
            app.close()

    def logs(self, chars: int = 3000) -> str:
        groups = [*self.workers.values(), *([self.code_server] if self.code_server else [])]
        return "\n".join(f"--- {g.name} log tail ---\n{g.log_tail(chars)}" for g in groups)

    def stop(self) -> list[str]:
        """Stop everything; returns processes still alive (should be none)."""
        groups = [*self.workers.values(), *([self.code_server] if self.code_server else []),
                  self.redis]
        for group in groups:
            group.signal(signal.SIGCONT)
            group.stop(grace=5)
        return [f"{p.pid} {p.name()}" for g in groups for p in g.leftovers()]


class CeleryDeployment:
    """One test's Dagster: DAGSTER_HOME (deploy/dagster.yaml on a fresh PostgreSQL
    database) and a dagster-daemon loading the test code location, on the cluster."""

    def __init__(self, tmp: Path, cluster: Cluster, *, postgres_url: str,
                 run_retries: bool = False, gpu_pool_limit: int | None = None,
                 max_retries: int = 1) -> None:
        self.cluster = cluster
        self.home = tmp / "home"
        self.home.mkdir(parents=True)
        (self.home / "dagster.yaml").write_text(instance_yaml(
            postgres_url=postgres_url, run_retries=run_retries, gpu_pool_limit=gpu_pool_limit,
            max_retries=max_retries))
        self.workspace = tmp / "workspace.yaml"
        self.workspace.write_text(json.dumps({"load_from": [{"grpc_server": {
            "host": "127.0.0.1", "port": cluster.code_port, "location_name": LOCATION}}]}))
        self.env = {**cluster.env, "DAGSTER_HOME": str(self.home)}
        self.daemon: Group | None = None
        self._instance: dg.DagsterInstance | None = None

    def start_daemon(self) -> None:
        self.daemon = Group("daemon", [sys.executable, "-m", "dagster._daemon", "run",
                                       "-w", str(self.workspace)],
                            self.env, self.home / "daemon.log")

    def check_alive(self) -> None:
        self.cluster.check_alive()
        if self.daemon is not None and self.daemon.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.daemon.proc.returncode}\n"
                                 f"{self.logs()}")

    def stop(self) -> tuple[list[str], list[str]]:
        """Stop the daemon and this test's run workers. Returns the run workers that were
        still running although every run had ended, and the processes still alive after
        the kill (should be none)."""
        if self._instance is not None:
            self._instance.dispose()
            self._instance = None
        if self.daemon is not None:
            self.daemon.stop(grace=5)
        hung, left = [], []
        _, running = psutil.wait_procs(self.cluster.run_workers(), timeout=15)
        for proc in running:  # a run worker ends soon after its run's last event
            hung.append(f"{proc.pid} {' '.join(proc.cmdline())[-120:]}")
            proc.kill()
            try:
                proc.wait(10)
            except psutil.TimeoutExpired:
                left.append(f"{proc.pid} run worker")
        if self.daemon is not None:
            left += [f"{p.pid} {p.name()}" for p in self.daemon.leftovers()]
        return hung, left

    def logs(self, chars: int = 3000) -> str:
        daemon = self.daemon.log_tail(chars) if self.daemon else ""
        return f"--- daemon log tail ---\n{daemon}\n{self.cluster.logs(chars)}"

    # -- Dagster ---------------------------------------------------------------------
    def instance(self) -> dg.DagsterInstance:
        if self._instance is None:
            self._instance = dg.DagsterInstance.from_config(str(self.home))
        return self._instance

    def kill_daemon(self) -> None:
        """kill -9 of the dagster-daemon (its runs and their workers live on)."""
        if self.daemon is not None:
            self.daemon.kill()

    def clock_offset(self, seconds: float) -> None:
        """Move the sensor's clock (read by the code server at every tick) ``seconds`` on."""
        Path(self.env["CLOCK_OFFSET_FILE"]).write_text(f"{seconds}")

    def launch(self, *partitions: str, tags: dict[str, str] | None = None) -> None:
        """Submit one stage_job run per partition to the run queue, all at once, the way
        `dagster job launch` does."""
        procs = [subprocess.Popen(
            [sys.executable, "-m", "dagster", "job", "launch", "-w", str(self.workspace),
             "-j", "stage_job", "--tags",
             json.dumps({**(tags or {}), "dagster/partition": key})],
            cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for key in partitions]
        for proc in procs:
            out, _ = proc.communicate(timeout=180)
            assert proc.returncode == 0, out.decode(errors="replace")[-3000:]

    def runs(self, partition: str | None = None) -> list[dg.DagsterRun]:
        """Every run (of ``partition`` only, if given), oldest first."""
        filters = dg.RunsFilter(tags={"dagster/partition": partition}) if partition else None
        records = self.instance().get_run_records(filters=filters)
        return [r.dagster_run for r in sorted(records, key=lambda r: r.create_timestamp)]

    def claimed_slots(self, pool: str = "gpu") -> list[str]:
        """Runs holding a slot of ``pool`` (steps of ended runs must not)."""
        info = self.instance().event_log_storage.get_concurrency_info(pool)
        return [f"{slot.run_id[:8]}:{slot.step_key}" for slot in info.claimed_slots]

    def wait(self, probe: Callable[[list[dg.DagsterRun]], Any], timeout: float, what: str
             ) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            got = probe(self.runs())
            if got:
                return got
            time.sleep(1.0)
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n"
                             f"{self.describe()}\n{self.logs()}")

    def describe(self) -> str:
        """Every run's status and tags, and the last events of each (for a failing test)."""
        lines = []
        for run in self.runs():
            lines.append(f"run {run.run_id[:8]} {run.status.value} parent={run.parent_run_id}"
                         f" tags={dict(run.tags)}")
            records = self.instance().get_records_for_run(run.run_id, limit=8,
                                                          ascending=False).records
            for rec in reversed(records):
                entry = rec.event_log_entry
                event = entry.dagster_event
                error = getattr(event.event_specific_data if event else None, "error", None)
                lines.append(f"    {event.event_type_value if event else '-'} "
                             f"{entry.user_message[:200]!r}"
                             f"{' ' + error.to_string()[:800] if error else ''}")
        return "\n".join(lines)

    def summary(self) -> str:
        """One line per run: status, lineage, and what the sensor decided."""
        lines = []
        for run in sorted(self.runs(), key=lambda r: r.tags.get(T.ATTEMPT, "1")):
            keys = (T.ATTEMPT, T.RELAUNCHED_FROM, T.HANDLED, T.GAVE_UP, T.WILL_RETRY)
            tags = {k.split("/")[-1]: v[:8] for k in keys if (v := run.tags.get(k))}
            lines.append(f"{run.run_id[:8]} {run.status.value:<9} parent="
                         f"{(run.parent_run_id or '-')[:8]} {tags}")
        return "\n".join(lines)

    def step_span(self, run_id: str) -> StepSpan:
        """The stage step's submission to Celery, its start and end, and the worker."""
        worker = submitted = started = ended = None
        for entry in self.instance().all_logs(run_id):
            event = entry.dagster_event
            if event is None or event.step_key != STAGE:
                continue
            if event.event_type == dg.DagsterEventType.ENGINE_EVENT:
                if entry.user_message.startswith("Submitting celery task") and submitted is None:
                    submitted = entry.timestamp
                data = event.engine_event_data
                worker_meta = data.metadata.get("Celery worker") if data else None
                if worker_meta is not None:
                    worker = str(worker_meta.value)
            elif event.event_type == dg.DagsterEventType.STEP_START and started is None:
                started = entry.timestamp
            elif event.is_step_success and ended is None:
                ended = entry.timestamp
        return StepSpan(run_id, worker, submitted, started, ended)

    def committed(self, partition: str) -> Any:
        """The stage's committed manifest of ``partition`` in the shared S3 store, or None."""
        from dagster_aws.s3 import S3Resource

        from longrun_dagster import AtomicObjectStoreIOManager

        io = AtomicObjectStoreIOManager(
            base_uri=self.cluster.base_uri,
            s3=S3Resource(endpoint_url=self.env["LONGRUN_S3_ENDPOINT"]))
        return io.partition_store().lookup([STAGE], partition)

    def materializations(self, partition: str, reused: bool | None = None) -> list[str]:
        """Run ids of the stage's materializations of ``partition`` (only those that
        computed it, or only those that reused a committed one, if ``reused`` says)."""
        records = self.instance().fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(STAGE), asset_partitions=[partition]),
            limit=100).records
        found = []
        for record in records:
            materialization = record.asset_materialization
            flag = materialization.metadata.get("reused") if materialization else None
            if reused is None or bool(flag and flag.value) == reused:
                found.append(record.run_id)
        return found


def heartbeat(run: dg.DagsterRun) -> Beat | None:
    """The run's own last heartbeat (not one a re-execution inherited), or None."""
    return Beat.decode(T.last_beat(T.own(run.tags, run.run_id, run.parent_run_id)))


def ns_pid_outside(tree: Iterable[psutil.Process], ns_pid: int) -> psutil.Process | None:
    """The process of ``tree`` whose innermost pid (its PID namespace's) is ``ns_pid``."""
    for proc in tree:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("NSpid:") and int(line.split()[-1]) == ns_pid:
                return proc
    return None


class LiveAttempts:
    """Watches, from its own thread and instance, that no partition ever has two live runs
    (STARTING, STARTED or CANCELING) at once, as the UI's run list would show it. Sampled:
    it can miss an overlap, never invent one."""

    LIVE = (dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED,
            dg.DagsterRunStatus.CANCELING)

    def __init__(self, home: Path, every: float = 0.5) -> None:
        import threading

        self.home, self.every = home, every
        self.overlaps: list[str] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        with dg.DagsterInstance.from_config(str(self.home)) as instance:
            while not self._stop.wait(self.every):
                live: dict[str, list[str]] = {}
                for run in instance.get_runs(filters=dg.RunsFilter(statuses=list(self.LIVE))):
                    key = run.tags.get("dagster/partition", "")
                    live.setdefault(key, []).append(f"{run.run_id[:8]}:{run.status.value}")
                self.samples += 1
                self.overlaps += [f"{time.strftime('%H:%M:%S')} {key}: {ids}"
                                  for key, ids in live.items() if len(ids) > 1]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
