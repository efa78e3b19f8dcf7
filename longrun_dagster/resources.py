"""Dagster resources a model stage calls every batch: ``GpuGuard`` (VRAM) and ``Heartbeat``."""

import hashlib
import time
from typing import Any

import dagster as dg
from pydantic import Field, PrivateAttr

from longrun_dagster import tags
from longrun_dagster.batches import StageRun
from longrun_dagster.errors import GpuMemoryExceeded, Preempted, SegmentEnded, StorageError
from longrun_dagster.gpu import Thresholds, VramGuard, choose_backend
from longrun_dagster.recovery import Beat, State

WORKING = ("QUEUED", "NOT_STARTED", "STARTING", "STARTED")
"""Run statuses in which a stage process keeps working (CANCELING asks it to stop)."""


class GpuGuard(dg.ConfigurableResource):  # type: ignore[type-arg]
    """Guards device memory for a model stage: cleanup at the soft threshold, a retryable
    failure at the hard one, leak warnings, and VRAM/utilisation telemetry as
    materialization metadata. Give a stage ``hook_resource_keys=["gpu"]`` and
    ``resources={"gpu": GpuGuard()}``. Without a GPU it guards host memory instead."""

    device_index: int = Field(default=0, description="Logical CUDA device (after "
                              "CUDA_VISIBLE_DEVICES) to guard.")
    backend: str = Field(default="auto", description="auto (NVML, then torch.cuda, then "
                         "host memory), nvml, torch, or host.")
    soft_threshold: float = Field(default=0.85, description="Fraction of device memory at "
                                  "which the guard runs gc + torch.cuda.empty_cache().")
    hard_threshold: float = Field(default=0.95, description="Fraction still used after "
                                  "cleanup at which the stage checkpoints and fails retryably.")
    sample_every_steps: int = Field(default=1, description="Read memory every N batches "
                                    "(raise it if batches take under a millisecond).")
    leak_window_steps: int = Field(default=50, description="Samples the leak trend is "
                                   "fitted over.")
    leak_warn_mb_per_1000_steps: float = Field(default=256.0, description="Climb rate of "
                                               "post-cleanup memory reported as a leak.")
    leak_warmup_steps: int = Field(default=3, description="Batches after setup left out "
                                   "of the leak trend (allocator caches and lazy "
                                   "initialisation grow there, then stop).")
    leak_min_samples: int = Field(default=10, description="Readings after warm-up before "
                                  "a leak trend is fitted at all.")
    fail_on_leak_within_steps: float | None = Field(
        default=None, description="Fail (retryably) when a leak is projected to hit the "
        "hard threshold within this many steps; unset: only warn.")
    baseline_after_setup: bool = Field(
        default=False, description="Judge thresholds and leaks on the memory a stage "
        "allocates beyond what the device held after its setup (for engines that "
        "pre-allocate, e.g. vLLM's gpu_memory_utilization): the budget is what setup left "
        "free, not the device total.")
    host_memory_limit_mb: int | None = Field(
        default=None, description="Host backend only: the memory budget (default: the cgroup "
        "limit, else physical RAM).")

    _guard: VramGuard | None = PrivateAttr(default=None)
    _instance: Any = PrivateAttr(default=None)
    _run_id: str | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._instance = context.instance
        self._run_id = context.run.run_id if context.run else None

    def build(self, log: Any = None) -> VramGuard:
        """A fresh plain guard with this configuration (used by on_start)."""
        limit = self.host_memory_limit_mb * 2**20 if self.host_memory_limit_mb else None
        kwargs = {"log": log} if log is not None else {}
        backend = choose_backend(self.backend, self.device_index, limit, **kwargs)
        return VramGuard(
            backend, Thresholds(self.soft_threshold, self.hard_threshold),
            sample_every=self.sample_every_steps, leak_window=self.leak_window_steps,
            leak_mb_per_1000_steps=self.leak_warn_mb_per_1000_steps,
            fail_on_leak_within_steps=self.fail_on_leak_within_steps,
            warmup_steps=self.leak_warmup_steps, leak_min_samples=self.leak_min_samples,
            **kwargs,
        )

    def on_prepare(self, run: StageRun) -> None:
        self._guard = self.build(_OncePerRun(run.log, self._instance, self._run_id))
        if run.need_vram_bytes:  # before the model is loaded onto a device without room
            self._guard.preflight(run.need_vram_bytes)

    def on_start(self, run: StageRun) -> None:
        if self._guard is None:
            self.on_prepare(run)
        assert self._guard is not None
        self._guard.observe()  # the baseline with the model loaded: not a leak
        if self.baseline_after_setup:
            baseline = self._guard.rebase()
            run.log.info(f"{self._guard.backend.device}: judging memory beyond the "
                         f"{baseline.used / 2**20:.0f} MiB of {baseline.total / 2**20:.0f} "
                         "MiB held after setup")

    def on_batch(self, run: StageRun) -> None:
        assert self._guard is not None, "on_start was not called"
        self._guard.step(run.progress.batches_total - run.progress.batches_done)

    def on_end(self, run: StageRun) -> dict[str, Any]:
        return self._guard.metadata() if self._guard is not None else {}


HEARTBEAT_TAG = tags.HEARTBEAT
STALLED_TAG = tags.STALLED
RUN_ID_TAG = tags.RUN_ID


class Heartbeat(dg.ConfigurableResource):  # type: ignore[type-arg]
    """Progress heartbeats for model stages, and the in-process watchdog.

    Publishes the time of the last completed batch as a run tag (one row of the runs
    table: the stalled-run sensor reads all running runs in one query), and with
    ``watchdog`` on, exits the process after ``stall_timeout_seconds`` without progress,
    leaving every thread's stack in the run log."""

    interval_seconds: float = Field(default=30.0, description="How often progress is "
                                    "published (only when there was progress).")
    stall_timeout_seconds: float = Field(default=900.0, description="No completed batch for "
                                         "this long means stalled.")
    watchdog: bool = Field(default=True, description="Exit a stalled process hard (frees its "
                           "GPU); the stalled-run sensor then relaunches the partition.")

    _instance: Any = PrivateAttr(default=None)
    _run_id: str | None = PrivateAttr(default=None)
    _dog: Any = PrivateAttr(default=None)
    _state: Any = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._instance = context.instance
        self._run_id = context.run.run_id if context.run else None

    def on_prepare(self, run: StageRun) -> None:
        """Start watching before the model loads: a hang there is a stall too. The beat is
        this step's own tag (``longrun/heartbeat/<asset>``): a parallel stage of the same
        run is judged by its own."""
        from longrun_dagster.heartbeat import Watchdog, current_process

        process, total = current_process(), run.progress.batches_total
        self._state = State.WORKING
        key = tags.heartbeat_key(run.asset or run.name)

        def publish(at: float, counters: dict[str, Any]) -> None:
            done = counters.get("batches_done", run.progress.batches_done)
            beat = Beat(at, done, total, process, self._state, run.generation)
            self._tag({key: beat.encode()},
                      {tags.PROGRESS: f"{run.name}: "
                                      f"{run.progress.summary(self._state != State.WORKING)}"})

        def stalled(stacks: str, silent_for: float) -> None:
            run.log.error(f"{run.name}: no progress for {silent_for:.0f}s (stall timeout "
                          f"{self.stall_timeout_seconds:.0f}s); exiting this process so the "
                          f"stalled-run sensor can relaunch the partition. Thread stacks:\n"
                          f"{stacks}")
            self._tag({STALLED_TAG: f"{time.time():.3f}"})

        def superseded(reason: str) -> None:
            run.log.error(f"{run.name}: {reason}; exiting this process (its work is another "
                          "run's now, and this one must not hold the device)")
            self._tag({tags.SUPERSEDED: reason})

        self._dog = Watchdog(publish, interval=self.interval_seconds,
                             stall_timeout=self.stall_timeout_seconds,
                             enforce=self.watchdog, on_stall=stalled,
                             check=lambda: self._superseded(run), on_superseded=superseded)
        self._dog.start()  # a failed first write is retried at the next tick, never raised

    def _superseded(self, run: StageRun) -> str | None:
        """Why this process's work is no longer its own, or None: its run is no longer live
        (the sensor or a user ended it) or another attempt claimed its partition. The claim
        is checked even when the run database cannot be read (a zombie cut off from it
        still ends itself once its partition is claimed elsewhere)."""
        unreadable: Exception | None = None
        if self._instance is not None and self._run_id is not None:
            try:
                record = self._instance.get_run_by_id(self._run_id)
            except Exception as exc:  # noqa: BLE001 - a database blip proves nothing
                record, unreadable = None, exc
            if record is not None and record.status.value not in WORKING:
                return f"its run {self._run_id} is {record.status.value}"
        if run.still_holds is not None and not run.still_holds():
            return "another attempt claimed its partition"
        if unreadable is not None:
            raise unreadable  # counted by the watchdog; the stall timeout still applies
        return None

    def on_start(self, run: StageRun) -> None:
        if self._dog is None or self._state != State.WORKING:
            self.on_prepare(run)

    def on_batch(self, run: StageRun) -> None:
        self._dog.progress(batches_done=run.progress.batches_done)

    def on_wait(self, run: StageRun) -> None:
        """Progress inside a batch (``stage.still_working()``): a provider batch the
        server reports working on; the beat advances, its batch count does not."""
        if self._dog is not None:
            self._dog.progress(batches_done=run.progress.batches_done)

    def on_end(self, run: StageRun) -> dict[str, Any]:
        if self._dog is None:
            return {}
        # Under the multiprocess executor this step's process exits while the run goes on
        # (the next step waiting for its pool, or a plain asset): say how it ended in its
        # last beat. Preempted is never "ended": the sensor relaunches it.
        self._state = stop_state(run.stopped_by)
        # the last beat is timed at the step's end, not its last batch: the commit after it
        # is judged from here ("frozen before its commit" only past the stall timeout)
        self._dog.progress(batches_done=run.progress.batches_done)
        failed = self._dog.failed_publishes
        self._dog.stop()  # publishes once more
        for delay in (0.5, 1.0, 2.0):  # a busy instance DB: this beat matters, try again
            if self._dog.failed_publishes == failed:
                break
            failed = self._dog.failed_publishes
            time.sleep(delay)
            self._dog.publish_now()
        return {"heartbeats_published": self._dog.published}

    def _tag(self, values: dict[str, str], plain: dict[str, str] | None = None) -> None:
        """``values`` marked as this run's own (the sensor reads them), ``plain`` as they
        are (for people)."""
        if self._instance is not None and self._run_id is not None:
            owned = {k: tags.mark(self._run_id, v) for k, v in values.items()}
            self._instance.add_run_tags(self._run_id, {**owned, **(plain or {}),
                                                       RUN_ID_TAG: self._run_id})


def stop_state(exc: BaseException | None) -> State:
    """What a stage step's last beat says, from what stopped its loop: nothing (ended), an
    interrupt (preempted), an error another attempt may not meet (error), or its own code
    (failed: not relaunched)."""
    if exc is None:
        return State.ENDED
    if isinstance(exc, Preempted | SegmentEnded | KeyboardInterrupt | SystemExit) or \
            type(exc).__name__ in INTERRUPTS:
        return State.PREEMPTED
    if isinstance(exc, StorageError | GpuMemoryExceeded | OSError | MemoryError):
        return State.ERROR
    return State.FAILED


INTERRUPTS = ("DagsterExecutionInterruptedError",)


class _OncePerRun:
    """A log whose ``info`` says a line once per run (each step of a run is its own
    process under the multiprocess executor, so the run's tags remember it); again, it is
    a debug line."""

    TAG = "longrun/vram_backend"

    def __init__(self, log: Any, instance: Any, run_id: str | None) -> None:
        self._log, self._instance, self._run_id = log, instance, run_id

    def info(self, message: str) -> None:
        said = hashlib.sha256(message.encode()).hexdigest()[:16]
        try:
            run = self._instance.get_run_by_id(self._run_id) if self._run_id else None
        except Exception:  # noqa: BLE001 - a log line must never fail a stage
            run = None
        if run is not None and run.tags.get(self.TAG) == said:
            self._log.debug(message)
            return
        self._log.info(message)
        if run is not None:
            try:
                self._instance.add_run_tags(self._run_id, {self.TAG: said})
            except Exception:  # noqa: BLE001 - said twice at worst
                pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._log, name)
