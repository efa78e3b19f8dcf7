"""The VRAM guard: read device memory each step, clean up at the soft threshold, fail
retryably at the hard one, and spot a leak before it becomes an OOM. No Dagster here.

Backends, chosen automatically (or by name): NVML through pynvml, torch.cuda, and host
memory (process RSS against the cgroup limit or RAM) so the same logic runs, and is
tested, on a machine without a GPU.
"""

import ctypes
import functools
import gc
import logging
import os
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
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
    live: int | None = None
    """Bytes in live allocations, where the backend can tell them from memory the
    allocator keeps or the OS maps (the leak trend follows it; thresholds follow used)."""

    @property
    def trend_bytes(self) -> int:
        return self.live if self.live is not None else self.used

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
    """A robust line (Theil-Sen) through memory readings taken after warm-up."""

    mb_per_1000_steps: float
    steps_to_hard: float | None
    """Projected steps until the hard threshold at this rate (None: not climbing)."""
    r_squared: float
    """How much of the readings' variation the line explains (1 - SS_res / SS_tot)."""
    samples: int = 0

    @property
    def mb_per_step(self) -> float:
        return self.mb_per_1000_steps / 1000


LEAK_MIN_SAMPLES = 10
"""Readings (after warm-up) before a trend is fitted at all."""


def leak_trend(samples: list[tuple[int, int]], hard_bytes: float,
               min_samples: int = LEAK_MIN_SAMPLES) -> LeakTrend | None:
    """Fit ``(step, bytes)`` samples with the Theil-Sen estimator (the median of pairwise
    slopes: one reading of allocator noise or a one-off spike does not make a trend);
    None with fewer than ``min_samples`` or no spread in steps."""
    if len(samples) < max(2, min_samples):
        return None
    points = np.asarray(samples, dtype=np.float64)
    xs, ys = points[:, 0], points[:, 1]
    i, j = _pairs(len(xs))
    dx = xs[j] - xs[i]
    keep = dx > 0
    if not keep.any():
        return None
    slope = _median((ys[j] - ys[i])[keep] / dx[keep])  # bytes per step
    intercept = _median(ys - slope * xs)
    fitted = intercept + slope * xs
    ss_tot = float(((ys - ys.mean()) ** 2).sum())
    r2 = max(0.0, 1.0 - float(((ys - fitted) ** 2).sum()) / ss_tot) if ss_tot > 0 else 0.0
    left = hard_bytes - fitted[-1]
    steps = left / slope if slope > 0 else None
    return LeakTrend(slope * 1000 / MB, max(steps, 0.0) if steps is not None else None, r2,
                     len(samples))


def _median(values: Any) -> float:
    """np.median without its NaN checks and copies (the values here are finite)."""
    n = len(values)
    half = n // 2
    part = np.partition(values, [half - 1, half] if n % 2 == 0 else [half])
    return float(part[half]) if n % 2 else float((part[half - 1] + part[half]) / 2)


@functools.cache
def _pairs(n: int) -> tuple[Any, Any]:
    return np.triu_indices(n, k=1)


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
        self.index = index
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
        return Reading(int(mem.used), int(mem.total), util, temp, _torch_live(self.index))

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
        return Reading(int(total - free), int(total), live=_torch_live(self.index))

    def cleanup(self) -> None:
        _torch_cleanup()


def _torch_live(index: int) -> int | None:
    """Bytes this process's tensors hold on the device (torch's caching allocator keeps
    more, and other processes use more: neither is a leak here), if torch uses CUDA."""
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_initialized():
            return int(torch.cuda.memory_allocated(index))
    except Exception:  # noqa: BLE001 - telemetry only: fall back to the device's figure
        pass
    return None


class HostMemoryBackend:
    """This process's memory against a limit: ``limit_bytes``, else the cgroup memory
    limit, else physical RAM. Used is anonymous resident memory (file-backed pages, such as
    libtorch's code paged in, are the kernel's to drop); the leak trend follows the bytes
    malloc has handed out and not got back (glibc's mallinfo2), not what it keeps cached."""

    name = "host"

    def __init__(self, limit_bytes: int | None = None) -> None:
        self.process = psutil.Process()
        self.total = limit_bytes or _cgroup_limit() or psutil.virtual_memory().total
        self.device = f"host memory ({self.total / 2**30:.1f} GiB limit)"
        self._mallinfo = _mallinfo2()
        self._anon = _anon_rss()

    def read(self) -> Reading:
        used = self._anon() if self._anon else int(self.process.memory_info().rss)
        return Reading(used, int(self.total), utilization=None,
                       live=self._mallinfo() if self._mallinfo else None)

    def cleanup(self) -> None:
        gc.collect()


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _anon_rss() -> Callable[[], int] | None:
    """A reader of resident memory that is not file-backed or shared (Linux
    /proc/self/statm: resident - shared pages), in bytes; None elsewhere. The file stays
    open: a pread is microseconds, an open and parse of /proc/self/status was 50x that."""
    try:
        fd = os.open("/proc/self/statm", os.O_RDONLY)
    except OSError:
        return None

    def anon() -> int:
        fields = os.pread(fd, 256, 0).split()
        return (int(fields[1]) - int(fields[2])) * _PAGE
    try:
        anon()
    except (OSError, ValueError, IndexError):
        os.close(fd)
        return None
    return anon


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _mallinfo2() -> Callable[[], int] | None:
    """A reader of glibc's in-use heap bytes (arena chunks in use + mmapped chunks), or
    None where glibc (2.33+) is not the allocator."""
    try:
        libc = ctypes.CDLL(None)
        call = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    call.restype = _MallInfo2

    def live() -> int:
        info = call()
        return int(info.uordblks + info.hblkhd)
    try:
        live()
    except OSError:
        return None
    return live


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


class BeyondBaseline:
    """A backend read relative to a baseline (the reading after the stage's setup): used
    and live bytes beyond it, against what the baseline left free. For engines that
    pre-allocate most of the device when they load (vLLM's ``gpu_memory_utilization``):
    the guard then judges what the stage allocates beyond that, not the device total."""

    def __init__(self, inner: Backend, baseline: Reading) -> None:
        self.inner, self.baseline = inner, baseline
        self.name = inner.name
        self.device = (f"{inner.device}, beyond the {baseline.used / MB:.0f} MiB held after "
                       "setup")

    def read(self) -> Reading:
        now, base = self.inner.read(), self.baseline
        live = None if now.live is None or base.live is None else max(0, now.live - base.live)
        return Reading(max(0, now.used - base.used), max(1, now.total - base.used),
                       now.utilization, now.temperature, live)

    def cleanup(self) -> None:
        self.inner.cleanup()


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
    """Call ``step()`` once per batch; it samples every ``sample_every`` steps. The leak
    trend skips the reading after setup and the first ``warmup_steps`` batches (allocator
    caches and lazy initialisation grow there, then stop) and is fitted only once it has
    ``leak_min_samples`` readings."""

    def __init__(self, backend: Backend, thresholds: Thresholds, *, sample_every: int = 1,
                 leak_window: int = 50, leak_mb_per_1000_steps: float = 256.0,
                 fail_on_leak_within_steps: float | None = None,
                 warmup_steps: int = 3, leak_min_samples: int = LEAK_MIN_SAMPLES,
                 log: Any = _log, cleanup: Callable[[], None] | None = None) -> None:
        self.backend, self.thresholds = backend, thresholds
        self.sample_every = max(1, sample_every)
        self.leak_mb = leak_mb_per_1000_steps
        self.fail_on_leak_within = fail_on_leak_within_steps
        self.warmup_steps = max(0, warmup_steps)
        self.leak_min_samples = max(3, leak_min_samples)
        self.log = log
        self.cleanup = cleanup or backend.cleanup
        self.baselines: deque[tuple[int, int, bool]] = deque(
            maxlen=max(self.leak_min_samples, leak_window))
        """(step, trend bytes, whether a cleanup ran just before the reading)."""
        self.telemetry = Telemetry()
        self.trend: LeakTrend | None = None
        self._warned_at = -1
        self.fit_every = max(1, self.baselines.maxlen // 5) if self.baselines.maxlen else 1
        self._unfitted = 0

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
        """Read and record without acting (the reading after setup: telemetry only, never
        part of the leak trend)."""
        reading = self.backend.read()
        self._record(reading)
        return reading

    def rebase(self) -> Reading:
        """From now on judge memory beyond what the device holds now (``BeyondBaseline``);
        the reading taken is the baseline."""
        baseline = self.backend.read()
        if baseline.used >= baseline.total:
            raise GpuMemoryExceeded(
                f"{self.backend.device}: {baseline.used / MB:.0f} MiB of "
                f"{baseline.total / MB:.0f} MiB are used after setup, nothing is left for the "
                "batches; lower what the engine pre-allocates (vLLM: gpu_memory_utilization) "
                "or the model's size")
        self.backend = BeyondBaseline(self.backend, baseline)
        return baseline

    def step(self, steps_left: int | None = None) -> Reading | None:
        """One batch done; ``steps_left``: batches still to come in this stage, if known
        (the leak warning projects over them)."""
        t = self.telemetry
        t.steps += 1
        if (t.steps - 1) % self.sample_every:
            return None
        reading = self.backend.read()
        cleaned = False
        if needs_cleanup(reading, self.thresholds):
            self.cleanup()
            t.cleanups += 1
            cleaned = True
            before, reading = reading, self.backend.read()
            self.log.info(f"{self.backend.device}: {before.fraction:.0%} used, over the soft "
                          f"threshold of {self.thresholds.soft:.0%}; cleaned up, now "
                          f"{reading.fraction:.0%}")
        self._record(reading)
        if t.steps > self.warmup_steps:
            self.baselines.append((t.steps, reading.trend_bytes, cleaned))
        if over_hard(reading, self.thresholds):
            raise GpuMemoryExceeded(
                f"{self.backend.device}: {reading.used / MB:.0f} MiB of {reading.total / MB:.0f}"
                f" MiB used ({reading.fraction:.0%}){' after cleanup' if cleaned else ''}, "
                f"over the hard threshold of {self.thresholds.hard:.0%} at step {t.steps}. "
                "The stage checkpointed; the retry starts in a fresh process. If it recurs, "
                "lower the batch size, free tensors you keep between batches, or raise "
                "hard_threshold"
            )
        self._check_leak(reading, steps_left)
        return reading

    def _record(self, reading: Reading) -> None:
        t = self.telemetry
        t.samples += 1
        t.peak = max(t.peak, reading.used)
        t.total_used += reading.used
        if reading.utilization is not None:
            t.utilization_sum += reading.utilization
            t.utilization_n += 1

    def _check_leak(self, reading: Reading, steps_left: int | None) -> None:
        # a trend moves slowly: refit every window/5 readings (a fit of 50 costs ~0.2 ms)
        self._unfitted += 1
        if self._unfitted < self.fit_every:
            return
        self._unfitted = 0
        # the hard threshold in the trend's units (live bytes, where the backend has them)
        hard = self.thresholds.hard * reading.total - (reading.used - reading.trend_bytes)
        self.trend = leak_trend([(s, b) for s, b, _ in self.baselines], hard,
                                self.leak_min_samples)
        if not is_leak(self.trend, self.leak_mb):
            return
        trend = self.trend
        assert trend is not None
        hits = trend.steps_to_hard is not None and (
            steps_left is None or trend.steps_to_hard <= steps_left)
        message = self._leak_message(trend, reading, steps_left, hits)
        if self.fail_on_leak_within is not None and hits and trend.steps_to_hard is not None \
                and trend.steps_to_hard <= self.fail_on_leak_within:
            raise GpuMemoryExceeded(message + "; failing before the OOM (fail_on_leak)")
        if self.telemetry.steps - self._warned_at >= len(self.baselines):
            self.telemetry.leak_warnings += 1
            self._warned_at = self.telemetry.steps
            self.log.warning(message)

    def _leak_message(self, trend: LeakTrend, reading: Reading, steps_left: int | None,
                      hits: bool) -> str:
        what = "live allocations" if reading.live is not None else "memory in use"
        after = " after cleanup" if any(c for _, _, c in self.baselines) else ""
        head = (f"{self.backend.device}: {what} grow {trend.mb_per_step:.2f} MB per batch"
                f"{after} over the last {trend.samples} sampled batches (r²="
                f"{trend.r_squared:.2f})")
        hard = f"the hard threshold ({self.thresholds.hard:.0%})"
        if steps_left is None:
            eta = f"{trend.steps_to_hard:.0f}" if trend.steps_to_hard is not None else "?"
            where = f"; at this rate {hard} is about {eta} batches away"
        elif hits:
            where = (f"; the {steps_left} batches left would cross {hard} in about "
                     f"{trend.steps_to_hard:.0f} batches")
        else:
            end = reading.used + trend.mb_per_step * MB * steps_left
            where = (f"; the {steps_left} batches left would add "
                     f"{trend.mb_per_step * steps_left:.0f} MB, ending at "
                     f"{end / reading.total:.0%}, under {hard}")
        return head + where + (". Something keeps references between batches (outputs kept"
                               " in a list, a growing cache, tensors that hold their graph)")

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
        if isinstance(self.backend, BeyondBaseline):
            meta["vram_baseline_mb"] = round(self.backend.baseline.used / MB, 1)
        process_used = getattr(self.backend, "process_used", None)
        mine = process_used() if process_used is not None else None
        if mine is not None:
            meta["vram_process_mb"] = round(mine / MB, 1)  # this process's share, per NVML
        return meta
