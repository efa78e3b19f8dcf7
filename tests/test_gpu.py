"""The VRAM guard: pure decisions, backend choice, and the guard for real on host memory."""

import ctypes
import gc
import logging
import os
import re
import statistics
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import psutil
import pytest
import torch

from longrun_dagster import AtomicObjectStoreIOManager, GpuGuard, GpuMemoryExceeded
from longrun_dagster.errors import ConfigError
from longrun_dagster.gpu import (
    MB,
    HostMemoryBackend,
    Reading,
    Thresholds,
    VramGuard,
    choose_backend,
    is_leak,
    leak_trend,
    needs_cleanup,
    over_hard,
    visible_device,
)
from tests.helpers import pipeline

GB = 1024 * MB


# -- pure decisions ----------------------------------------------------------------------


def test_thresholds_decide_cleanup_and_failure() -> None:
    t = Thresholds(soft=0.8, hard=0.9)
    assert not needs_cleanup(Reading(79, 100), t)
    assert needs_cleanup(Reading(80, 100), t) and not over_hard(Reading(89, 100), t)
    assert over_hard(Reading(90, 100), t)
    with pytest.raises(ConfigError, match="soft <= hard"):
        Thresholds(soft=0.95, hard=0.9)


def test_steady_climb_is_a_leak_with_rate_and_eta() -> None:
    samples = [(step, 1 * GB + step * 2 * MB) for step in range(1, 51)]
    trend = leak_trend(samples, hard_bytes=2 * GB)
    assert trend is not None
    assert trend.mb_per_1000_steps == pytest.approx(2000, rel=1e-6)
    assert trend.steps_to_hard == pytest.approx((1024 - 100) / 2, rel=1e-3)
    assert is_leak(trend, min_mb_per_1000=256)


def test_noise_and_sawtooth_are_not_leaks() -> None:
    flat = [(s, GB + (s % 3) * MB) for s in range(1, 51)]
    assert not is_leak(leak_trend(flat, 2 * GB), 256)
    assert leak_trend(flat[:4], 2 * GB) is None  # too few samples to say


def test_one_spike_or_an_early_climb_is_not_a_trend() -> None:
    """Theil-Sen: a single outlier reading does not tilt the line (least squares did)."""
    spiky = [(s, GB + (s % 2) * MB) for s in range(1, 41)]
    spiky[-1] = (40, GB + 900 * MB)
    assert not is_leak(leak_trend(spiky, 2 * GB), 256)
    assert leak_trend(spiky[:9], 2 * GB) is None  # under 10 readings: no trend at all


class Collected(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def run_model(batches: int, keep: list[torch.Tensor] | None) -> tuple[VramGuard, list[str]]:
    """A real torch model over ``batches`` batches of 256 x 384 under the host backend,
    every reading; ``keep`` collects each batch's 256 x 1024 hidden activations (1 MiB):
    the classic leak."""
    torch.manual_seed(0)
    logger = logging.getLogger(f"test-leak-{id(keep)}")
    collected = Collected()
    logger.addHandler(collected)
    with torch.no_grad():
        hidden = torch.nn.Sequential(torch.nn.Linear(384, 1024), torch.nn.ReLU())
        head = torch.nn.Linear(1024, 384)
        guard = VramGuard(HostMemoryBackend(), Thresholds(0.99, 0.999), log=logger)
        guard.observe()  # after "setup": the model is loaded
        for index in range(batches):
            h = hidden(torch.randn(256, 384))
            head(h).numpy().sum()
            if keep is not None:
                keep.append(h.clone())
            guard.step(steps_left=batches - index - 1)
    return guard, collected.messages


def test_a_real_model_that_does_not_leak_is_never_flagged() -> None:
    """Hundreds of batches of a real model: its first batches grow memory (allocator,
    MKL buffers) and then stop; no warning, ever."""
    guard, messages = run_model(400, keep=None)
    assert guard.telemetry.leak_warnings == 0, messages
    assert guard.trend is not None and abs(guard.trend.mb_per_step) < 0.05


def test_a_real_leaking_model_is_flagged_with_its_rate() -> None:
    kept: list[torch.Tensor] = []
    guard, messages = run_model(60, keep=kept)
    kept.clear()
    assert guard.telemetry.leak_warnings >= 1
    assert guard.trend is not None and guard.trend.mb_per_step == pytest.approx(1.0, rel=0.1)
    warning = messages[0]
    assert "live allocations grow 1.0" in warning and "MB per batch over" in warning
    assert "after cleanup" not in warning  # none ran
    assert "batches left would add" in warning  # projected over what remains


def test_file_pages_mapped_in_are_not_a_leak(tmp_path: Path) -> None:
    """Whole-process RSS counts file-backed pages as a library is paged in; that growth
    is the kernel's to drop, not a leak."""
    import mmap

    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(64 * MB))
    guard = VramGuard(HostMemoryBackend(), Thresholds(0.99, 0.999))
    rss = []
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as pages:
        for index in range(32):
            pages[index * 2 * MB:(index + 1) * 2 * MB:4096]  # page 2 MiB more in
            rss.append(psutil.Process().memory_info().rss)
            guard.step(steps_left=31 - index)
    assert rss[-1] - rss[0] > 40 * MB  # RSS climbed
    assert guard.telemetry.leak_warnings == 0


def test_cuda_visible_devices_maps_logical_to_physical(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert visible_device(1) == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaa,GPU-bbbb")
    assert visible_device(0) == "GPU-aaaa"
    with pytest.raises(ConfigError, match="not visible"):
        visible_device(2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_device(1) == 1


class Scripted:
    """A backend that replays readings: decisions tested without a device."""

    name = "scripted"
    device = "scripted device"

    def __init__(self, readings: list[int], total: int = 100) -> None:
        self.readings, self.total, self.cleanups = list(readings), total, 0

    def read(self) -> Reading:
        return Reading(self.readings.pop(0), self.total)

    def cleanup(self) -> None:
        self.cleanups += 1


def test_soft_threshold_cleans_up_and_rereads() -> None:
    backend = Scripted([90, 50])
    guard = VramGuard(backend, Thresholds(0.85, 0.95))
    assert guard.step() == Reading(50, 100)
    assert backend.cleanups == 1 and guard.telemetry.cleanups == 1


def test_hard_threshold_after_cleanup_fails_with_numbers_and_fix() -> None:
    guard = VramGuard(Scripted([99 * MB, 97 * MB], total=100 * MB), Thresholds(0.85, 0.95))
    with pytest.raises(GpuMemoryExceeded) as err:
        guard.step()
    text = str(err.value)
    for part in ("97 MiB of 100 MiB", "95%", "lower the batch size", "fresh process"):
        assert part in text


def test_sampling_every_n_steps_reads_less() -> None:
    backend = Scripted([10] * 3)
    guard = VramGuard(backend, Thresholds(), sample_every=10)
    for _ in range(21):
        guard.step()
    assert backend.readings == [] and guard.telemetry.samples == 3


def test_preflight_names_free_and_needed_memory() -> None:
    guard = VramGuard(Scripted([90 * MB], total=100 * MB), Thresholds())
    with pytest.raises(GpuMemoryExceeded, match="10 MiB free.*needs 50 MiB"):
        guard.preflight(50 * MB)


# -- backends on this machine -------------------------------------------------------------


def test_auto_backend_falls_back_to_host_memory_and_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the gpu-marked tests cover it")
    with caplog.at_level(logging.INFO):
        backend = choose_backend("auto")
    assert isinstance(backend, HostMemoryBackend)
    assert "NVML unavailable" in caplog.text and "torch.cuda unavailable" in caplog.text
    reading = backend.read()
    assert 0 < reading.used < reading.total
    with pytest.raises(ConfigError, match="'nvml' requested"):
        choose_backend("nvml")


def test_host_backend_sees_a_real_allocation() -> None:
    backend = HostMemoryBackend()
    before = backend.read().used
    held = bytearray(os.urandom(1)) * (200 * MB)  # touched pages count in RSS
    after = backend.read().used
    assert after - before > 150 * MB
    del held


# -- the guard for real, on host memory, inside a stage -------------------------------------


HOLD: list[bytearray] = []


def test_growing_allocation_cleans_up_warns_then_fails_and_resumes(tmp_path: Path) -> None:
    """A stage that holds ever more memory must be stopped before the OOM and resume."""
    from longrun_dagster import model_stage

    def leaking_setup(stage: Any) -> Any:
        HOLD.clear()  # a fresh attempt starts clean, as a fresh process would
        gc.collect()
        ctypes.CDLL(None).malloc_trim(0)  # (glibc keeps freed heap memory resident)
        return pipeline.load_model(stage)

    def score_and_leak(batch: pd.DataFrame, stage: Any) -> pd.DataFrame:
        block = bytearray(12 * MB)
        block[::4096] = b"\x01" * len(block[::4096])  # touch every page: resident
        HOLD.append(block)
        return pipeline.score_batch(batch, stage)

    stage = model_stage(upstream=pipeline.texts, schema=pipeline.Scored,
                        partitions_def=pipeline.DAYS, batch_size=10,
                        checkpoint_every_batches=100, checkpoint_every_seconds=3600,
                        setup=leaking_setup, name="scores", hook_resource_keys=["gpu"],
                        oom_retries=6)(score_and_leak)
    io = AtomicObjectStoreIOManager(base_uri=(tmp_path / "lr").as_uri())
    clean = AtomicObjectStoreIOManager(base_uri=(tmp_path / "clean").as_uri())
    day = "2024-01-02"
    pipeline.CALLS.clear()
    instance = dg.DagsterInstance.ephemeral()
    assert dg.materialize([pipeline.texts, pipeline.scores], partition_key=day,
                          instance=instance, resources={"io_manager": clean}).success
    # the baseline after a run like this one (Dagster, torch, the upstream read), with
    # what earlier tests freed given back to the OS: thresholds are relative to it
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)
    used = HostMemoryBackend().read().used
    limit = used + 600 * MB
    guard = GpuGuard(backend="host", host_memory_limit_mb=limit // MB,
                     soft_threshold=(used + 60 * MB) / limit,
                     hard_threshold=(used + 160 * MB) / limit, leak_window_steps=10,
                     leak_warmup_steps=1, leak_min_samples=5)
    result = dg.materialize([pipeline.texts, stage], partition_key=day, instance=instance,
                            resources={"io_manager": io, "gpu": guard})
    assert result.success
    HOLD.clear()
    logs = "\n".join(e.user_message for e in instance.all_logs(result.run_id))
    assert "host memory" in logs  # which backend, and why
    rates = [float(r) for r in re.findall(r"live allocations grow ([0-9.]+) MB per batch "
                                          r"after cleanup", logs)]  # the leak warning
    assert rates and 10.0 < statistics.median(rates) < 15.0, logs
    assert "over the hard threshold" in logs
    assert "over the soft threshold" in logs and "cleaned up" in logs
    restarts = [e for e in result.all_events if e.event_type_value == "STEP_RESTARTED"]
    assert restarts, "the hard threshold must end the attempt and retry"
    assert "resuming from checkpoint" in logs
    meta = {k: v.value for k, v in result.get_asset_materialization_events()[-1]
            .step_materialization_data.materialization.metadata.items()}
    assert meta["vram_backend"] == "host" and meta["vram_peak_mb"] > 0
    assert {"vram_mean_mb", "vram_cleanups", "vram_leak_mb_per_1000_steps"} <= set(meta)
    assert pipeline.committed_sha(io, day) == pipeline.committed_sha(clean, day)


def test_fail_on_leak_stops_before_the_oom() -> None:
    """With fail_on_leak_within_steps, a climb projected to hit the hard threshold soon is
    a retryable failure now, not an OOM later."""
    climbing = [(10 + 2 * step) * MB for step in range(40)]
    guard = VramGuard(Scripted(climbing, total=100 * MB), Thresholds(0.9, 0.95),
                      leak_window=10, leak_mb_per_1000_steps=100,
                      fail_on_leak_within_steps=20)
    with pytest.raises(GpuMemoryExceeded, match="failing before the OOM"):
        for _ in range(40):
            guard.step()
    assert guard.trend is not None and guard.trend.steps_to_hard is not None
    assert guard.trend.steps_to_hard <= 20 and guard.telemetry.steps < 40


PREALLOCATED: list[Any] = []
LIMIT: list[int] = []


def test_an_engine_that_preallocates_90_percent_causes_no_cleanup_storm_nor_a_false_leak(
        tmp_path: Path) -> None:
    """vLLM's LLM(...) takes gpu_memory_utilization (0.9) of the device when it loads. A
    guard judging the device total cleans up after every batch (90% > the soft 85%);
    with baseline_after_setup it judges what the stage allocates beyond its setup, and a
    real growth beyond it is still a leak. (The host backend stands in for the device:
    setup allocates whatever takes this process to 90% of the guard's limit.)"""
    from longrun_dagster import model_stage

    def engine_setup(stage: Any) -> Any:
        model = pipeline.load_model(stage)
        PREALLOCATED.clear()
        size = max(0, int(0.90 * LIMIT[-1]) - HostMemoryBackend().read().used)
        block = bytearray(size)
        block[::4096] = b"\x01" * len(block[::4096])  # resident, as a KV cache is
        PREALLOCATED.append(block)
        return model

    def leak(batch: pd.DataFrame, stage: Any) -> pd.DataFrame:
        if stage.config.get("leak"):
            block = bytearray(4 * MB)
            block[::4096] = b"\x01" * len(block[::4096])
            HOLD.append(block)
        return pipeline.score_batch(batch, stage)

    io = AtomicObjectStoreIOManager(base_uri=(tmp_path / "lr").as_uri())
    day = "2024-01-02"
    instance = dg.DagsterInstance.ephemeral()
    assert dg.materialize([pipeline.texts], partition_key=day, instance=instance,
                          resources={"io_manager": io}).success

    def run(name: str, *, baseline: bool, leaking: bool = False) -> dict[str, Any]:
        gc.collect()
        ctypes.CDLL(None).malloc_trim(0)
        LIMIT.append(HostMemoryBackend().read().used + 800 * MB)
        stage = model_stage(upstream=pipeline.texts, schema=pipeline.Scored,
                            partitions_def=pipeline.DAYS, batch_size=8, name=name,
                            setup=engine_setup, hook_resource_keys=["gpu"],
                            config={"leak": leaking})(leak)
        guard = GpuGuard(backend="host", host_memory_limit_mb=LIMIT[-1] // MB,
                         baseline_after_setup=baseline, leak_window_steps=10,
                         leak_warmup_steps=1, leak_min_samples=5,
                         leak_warn_mb_per_1000_steps=500.0)
        result = dg.materialize([pipeline.texts, stage], partition_key=day,
                                instance=instance, selection=[stage.key],
                                resources={"io_manager": io, "gpu": guard})
        assert result.success
        HOLD.clear()
        PREALLOCATED.clear()
        [mat] = result.asset_materializations_for_node(name)
        return {k: v.value for k, v in mat.metadata.items()}

    total = run("device_total", baseline=False)
    assert total["vram_cleanups"] >= total["batches"] - 1  # the storm, without a baseline
    beyond = run("beyond_setup", baseline=True)
    assert beyond["vram_cleanups"] == 0 and beyond["vram_leak_warnings"] == 0, beyond
    assert beyond["vram_baseline_mb"] >= 0.85 * LIMIT[-1] / MB
    leaking = run("leaking_beyond_setup", baseline=True, leaking=True)
    assert leaking["vram_leak_warnings"] >= 1 and \
        3000 < leaking["vram_leak_mb_per_1000_steps"] < 5000, leaking
