"""The VRAM guard on a real NVIDIA GPU (marked ``gpu``; skipped without one).

Imports only torch and ``longrun_dagster.gpu`` so it also runs on a GPU machine that has
no Dagster installed (see bench/README.md for the command).
"""

import pytest
import torch

from longrun_dagster.errors import GpuMemoryExceeded
from longrun_dagster.gpu import MB, Thresholds, VramGuard, choose_backend

GB = 1024 * MB
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["nvml", "torch"])
def test_gpu_backends_read_the_device(kind: str) -> None:
    backend = choose_backend(kind)
    before = backend.read()
    block = torch.empty(2 * GB, dtype=torch.uint8, device="cuda")
    after = backend.read()
    assert after.used - before.used >= 1.5 * GB
    assert backend.device
    del block
    torch.cuda.empty_cache()


@pytest.mark.gpu
def test_real_cuda_leak_is_reported_then_stopped_before_oom() -> None:
    """A CUDA loop that keeps 512 MiB per step must be warned about, then failed."""
    backend = choose_backend("nvml")
    start = backend.read()
    leak_budget = 24 * GB
    hard = min(0.99, (start.used + leak_budget) / start.total)
    soft = min(hard, (start.used + leak_budget / 2) / start.total)
    guard = VramGuard(backend, Thresholds(soft, hard), leak_window=8,
                      leak_mb_per_1000_steps=1000)
    held = []
    with pytest.raises(GpuMemoryExceeded, match="over the hard threshold"):
        for _ in range(200):
            held.append(torch.ones(512 * MB // 4, device="cuda"))
            torch.cuda.synchronize()
            guard.step()
    assert guard.telemetry.cleanups > 0 and guard.telemetry.leak_warnings > 0
    assert guard.trend is not None and guard.trend.mb_per_1000_steps > 400_000
    print(f"leak {guard.trend.mb_per_1000_steps:.0f} MB/1000 steps, "
          f"{guard.telemetry.steps} steps, peak {guard.telemetry.peak / GB:.1f} GiB")
    held.clear()
    torch.cuda.empty_cache()


@pytest.mark.gpu
def test_soft_threshold_cleanup_returns_cached_memory_to_the_device() -> None:
    """Freed tensors stay in torch's cache (NVML counts them); cleanup must release them."""
    backend = choose_backend("nvml")
    start = backend.read()
    block = torch.ones(8 * GB // 4, device="cuda")
    del block  # freed to torch's caching allocator, still used as far as NVML knows
    cached = backend.read()
    assert cached.used - start.used >= 7 * GB
    soft = (start.used + 4 * GB) / start.total
    guard = VramGuard(backend, Thresholds(soft, min(1.0, soft + 0.2)))
    after = guard.step()
    assert guard.telemetry.cleanups == 1
    assert after is not None and after.used - start.used < 1 * GB
