"""The VRAM guard: read device memory each step, clean up at the soft threshold, fail
retryably at the hard one, and spot a leak before it becomes an OOM. No Dagster here.

Backends, chosen automatically (or by name): NVML through pynvml, torch.cuda, and host
memory (process RSS against the cgroup limit or RAM) so the same logic runs, and is
tested, on a machine without a GPU.
"""

import gc
import logging
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import psutil

from longrun_dagster.errors import ConfigError, GpuMemoryExceeded

MB = 1024 * 1024
_log = logging.getLogger("longrun_dagster.gpu")


@dataclass(frozen=True)
class Reading:
    """One look at a device's memory: bytes used and total, utilisation if known."""

    used: int
    total: int
    utilization: float | None = None
    temperature: float | None = None

    @property
    def fraction(self) -> float:
        return self.used / self.total if self.total else 0.0


class Backend(Protocol):
    name: str
    device: str

    def read(self) -> Reading: ...

    def cleanup(self) -> None: ...


# -- the decisions (pure) --------------------------------------------------------------


@dataclass(frozen=True)
class Thresholds:
    soft: float = 0.85
    hard: float = 0.95

    def __post_init__(self) -> None:
        if not 0.0 < self.soft <= self.hard <= 1.0:
            raise ConfigError(f"VRAM thresholds need 0 < soft <= hard <= 1, got soft="
                              f"{self.soft}, hard={self.hard}; e.g. soft=0.85, hard=0.95")


def needs_cleanup(reading: Reading, thresholds: Thresholds) -> bool:
    return reading.fraction >= thresholds.soft


def over_hard(reading: Reading, thresholds: Thresholds) -> bool:
    return reading.fraction >= thresholds.hard


@dataclass(frozen=True)
class LeakTrend:
    """A least-squares line through post-cleanup memory baselines."""

    mb_per_1000_steps: float
    steps_to_hard: float | None
    """Projected steps until the hard threshold at this rate (None: not climbing)."""
    r_squared: float


def leak_trend(samples: list[tuple[int, int]], hard_bytes: float) -> LeakTrend | None:
    """Fit ``(step, baseline bytes)`` samples; None with fewer than 5 or no spread."""
    if len(samples) < 5:
        return None
    n = len(samples)
    xs = [float(s) for s, _ in samples]
    ys = [float(b) for _, b in samples]
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    syy = sum((y - my) ** 2 for y in ys)
    slope = sxy / sxx  # bytes per step
    r2 = (sxy * sxy) / (sxx * syy) if syy > 0 else 0.0
    left = hard_bytes - ys[-1]
    steps = left / slope if slope > 0 else None
    return LeakTrend(slope * 1000 / MB, max(steps, 0.0) if steps is not None else None, r2)


def is_leak(trend: LeakTrend | None, min_mb_per_1000: float, min_r2: float = 0.8) -> bool:
    """A steady climb: fast enough, and a line that explains most of the variation."""
    return trend is not None and trend.mb_per_1000_steps >= min_mb_per_1000 and \
        trend.r_squared >= min_r2


# -- backends --------------------------------------------------------------------------


def visible_device(index: int) -> str | int:
    """The NVML id of logical CUDA device ``index``, honouring CUDA_VISIBLE_DEVICES."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or visible.strip() == "":
        return index
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    if index >= len(ids):
        raise ConfigError(f"device_index {index} is not visible: CUDA_VISIBLE_DEVICES="
                          f"{visible!r} shows {len(ids)} device(s); use 0..{len(ids) - 1}")
    chosen = ids[index]
    return int(chosen) if chosen.isdigit() else chosen


class NvmlBackend:
    name = "nvml"

    def __init__(self, index: int) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        ident = visible_device(index)
        self.handle = (pynvml.nvmlDeviceGetHandleByIndex(ident) if isinstance(ident, int)
                       else pynvml.nvmlDeviceGetHandleByUUID(ident))
        name = pynvml.nvmlDeviceGetName(self.handle)
        self.device = name.decode() if isinstance(name, bytes) else str(name)

    def read(self) -> Reading:
        nv = self._nvml
        mem = nv.nvmlDeviceGetMemoryInfo(self.handle)
        util = temp = None
        try:
            util = float(nv.nvmlDeviceGetUtilizationRates(self.handle).gpu)
            temp = float(nv.nvmlDeviceGetTemperature(self.handle, nv.NVML_TEMPERATURE_GPU))
        except nv.NVMLError:
            pass
        return Reading(int(mem.used), int(mem.total), util, temp)

    def process_used(self) -> int | None:
        """This process's VRAM per NVML, where the driver reports it."""
        try:
            procs = self._nvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
        except self._nvml.NVMLError:
            return None
        mine = [p.usedGpuMemory for p in procs if p.pid == os.getpid() and p.usedGpuMemory]
        return int(sum(mine)) if mine else None

    def cleanup(self) -> None:
        _torch_cleanup()


class TorchCudaBackend:
    name = "torch.cuda"

    def __init__(self, index: int) -> None:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("torch.cuda is not available")
        self.torch = torch
        self.index = index
        self.device = torch.cuda.get_device_name(index)

    def read(self) -> Reading:
        free, total = self.torch.cuda.mem_get_info(self.index)
        return Reading(int(total - free), int(total))

    def cleanup(self) -> None:
        _torch_cleanup()


class HostMemoryBackend:
    """This process's resident memory against a limit: ``limit_bytes``, else the cgroup
    memory limit, else physical RAM."""

    name = "host"

    def __init__(self, limit_bytes: int | None = None) -> None:
        self.process = psutil.Process()
        self.total = limit_bytes or _cgroup_limit() or psutil.virtual_memory().total
        self.device = f"host memory ({self.total / 2**30:.1f} GiB limit)"

    def read(self) -> Reading:
        return Reading(int(self.process.memory_info().rss), int(self.total),
                       utilization=None)

    def cleanup(self) -> None:
        gc.collect()


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as limit_file:
                text = limit_file.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:
            return int(text)
    return None


def _torch_cleanup() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    except ImportError:
        pass


def choose_backend(kind: str = "auto", index: int = 0, host_limit_bytes: int | None = None,
                   log: Any = _log) -> Backend:
    """NVML, then torch.cuda, then host memory; logs which one and why."""
    if kind not in ("auto", "nvml", "torch", "host"):
        raise ConfigError(f"unknown VRAM backend {kind!r}; use auto, nvml, torch or host")
    reasons = []
    if kind in ("auto", "nvml"):
        try:
            backend: Backend = NvmlBackend(index)
            log.info(f"VRAM guard: NVML on {backend.device} (device {index})")
            return backend
        except Exception as exc:  # noqa: BLE001 - any NVML failure means: not this backend
            reasons.append(f"NVML unavailable ({type(exc).__name__}: {exc})")
            if kind == "nvml":
                raise ConfigError(f"VRAM backend 'nvml' requested but {reasons[-1]}; install "
                                  "the NVIDIA driver or use backend='auto'") from exc
    if kind in ("auto", "torch"):
        try:
            backend = TorchCudaBackend(index)
            log.info(f"VRAM guard: torch.cuda on {backend.device} ({'; '.join(reasons)})")
            return backend
        except Exception as exc:  # noqa: BLE001
            reasons.append(f"torch.cuda unavailable ({exc})")
            if kind == "torch":
                raise ConfigError(f"VRAM backend 'torch' requested but {reasons[-1]}") from exc
    backend = HostMemoryBackend(host_limit_bytes)
    why = "; ".join(reasons) or "requested"
    log.info(f"VRAM guard: no GPU backend, guarding {backend.device} instead ({why})")
    return backend


# -- the guard -------------------------------------------------------------------------


@dataclass
class Telemetry:
    steps: int = 0
    samples: int = 0
    peak: int = 0
    total_used: float = 0.0
    utilization_sum: float = 0.0
    utilization_n: int = 0
    cleanups: int = 0
    leak_warnings: int = 0


class VramGuard:
    """Call ``step()`` once per batch; it samples every ``sample_every`` steps."""

    def __init__(self, backend: Backend, thresholds: Thresholds, *, sample_every: int = 1,
                 leak_window: int = 50, leak_mb_per_1000_steps: float = 256.0,
                 fail_on_leak_within_steps: float | None = None,
                 log: Any = _log, cleanup: Callable[[], None] | None = None) -> None:
        self.backend, self.thresholds = backend, thresholds
        self.sample_every = max(1, sample_every)
        self.leak_mb = leak_mb_per_1000_steps
        self.fail_on_leak_within = fail_on_leak_within_steps
        self.log = log
        self.cleanup = cleanup or backend.cleanup
        self.baselines: deque[tuple[int, int]] = deque(maxlen=max(5, leak_window))
        self.telemetry = Telemetry()
        self.trend: LeakTrend | None = None
        self._warned_at = -1

    def preflight(self, need_bytes: int) -> Reading:
        """Fail now, clearly, if the device lacks ``need_bytes`` free."""
        reading = self.backend.read()
        free = reading.total - reading.used
        if free < need_bytes:
            raise GpuMemoryExceeded(
                f"{self.backend.device}: {free / MB:.0f} MiB free, the stage declares it needs "
                f"{need_bytes / MB:.0f} MiB; free the device (another run may hold it), "
                "lower the batch size, or lower the stage's declared need"
            )
        return reading

    def observe(self) -> Reading:
        """Read and record without acting (the baseline before the first batch)."""
        reading = self.backend.read()
        self._record(reading)
        return reading

    def step(self) -> Reading | None:
        t = self.telemetry
        t.steps += 1
        if (t.steps - 1) % self.sample_every:
            return None
        reading = self.backend.read()
        if needs_cleanup(reading, self.thresholds):
            self.cleanup()
            t.cleanups += 1
            before, reading = reading, self.backend.read()
            self.log.info(f"{self.backend.device}: {before.fraction:.0%} used, over the soft "
                          f"threshold of {self.thresholds.soft:.0%}; cleaned up, now "
                          f"{reading.fraction:.0%}")
        self._record(reading)
        if over_hard(reading, self.thresholds):
            raise GpuMemoryExceeded(
                f"{self.backend.device}: {reading.used / MB:.0f} MiB of {reading.total / MB:.0f}"
                f" MiB used ({reading.fraction:.0%}) after cleanup, over the hard threshold of "
                f"{self.thresholds.hard:.0%} at step {t.steps}. The stage checkpointed; the "
                "retry starts in a fresh process. If it recurs, lower the batch size, free "
                "tensors you keep between batches, or raise hard_threshold"
            )
        self._check_leak(reading)
        return reading

    def _record(self, reading: Reading) -> None:
        t = self.telemetry
        t.samples += 1
        t.peak = max(t.peak, reading.used)
        t.total_used += reading.used
        if reading.utilization is not None:
            t.utilization_sum += reading.utilization
            t.utilization_n += 1
        self.baselines.append((t.steps, reading.used))

    def _check_leak(self, reading: Reading) -> None:
        self.trend = leak_trend(list(self.baselines), self.thresholds.hard * reading.total)
        if not is_leak(self.trend, self.leak_mb):
            return
        trend = self.trend
        assert trend is not None
        eta = f"{trend.steps_to_hard:.0f}" if trend.steps_to_hard is not None else "?"
        message = (f"{self.backend.device}: memory climbs {trend.mb_per_1000_steps:.0f} MB per "
                   f"1,000 steps after cleanup (r²={trend.r_squared:.2f}); the hard threshold "
                   f"is about {eta} steps away. Something keeps references between batches")
        if self.fail_on_leak_within is not None and trend.steps_to_hard is not None and \
                trend.steps_to_hard <= self.fail_on_leak_within:
            raise GpuMemoryExceeded(message + "; failing before the OOM (fail_on_leak)")
        if self.telemetry.steps - self._warned_at >= len(self.baselines):
            self.telemetry.leak_warnings += 1
            self._warned_at = self.telemetry.steps
            self.log.warning(message)

    def metadata(self) -> dict[str, Any]:
        """Telemetry for the materialization (the UI plots it across partitions)."""
        t = self.telemetry
        meta: dict[str, Any] = {
            "vram_backend": self.backend.name,
            "vram_device": self.backend.device,
            "vram_peak_mb": round(t.peak / MB, 1),
            "vram_mean_mb": round(t.total_used / t.samples / MB, 1) if t.samples else 0.0,
            "vram_cleanups": t.cleanups,
            "vram_leak_mb_per_1000_steps": round(self.trend.mb_per_1000_steps, 2)
            if self.trend else 0.0,
            "vram_leak_warnings": t.leak_warnings,
        }
        if t.utilization_n:
            meta["gpu_utilization_mean"] = round(t.utilization_sum / t.utilization_n, 1)
        process_used = getattr(self.backend, "process_used", None)
        mine = process_used() if process_used is not None else None
        if mine is not None:
            meta["vram_process_mb"] = round(mine / MB, 1)  # this process's share, per NVML
        return meta
