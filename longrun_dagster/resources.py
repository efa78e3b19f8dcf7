"""Dagster resources: ``GpuGuard``, the VRAM guard a model stage calls every batch."""

from typing import Any

import dagster as dg
from pydantic import Field, PrivateAttr

from longrun_dagster.batches import StageRun
from longrun_dagster.gpu import Thresholds, VramGuard, choose_backend


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
    fail_on_leak_within_steps: float | None = Field(
        default=None, description="Fail (retryably) when a leak is projected to hit the "
        "hard threshold within this many steps; unset: only warn.")
    host_memory_limit_mb: int | None = Field(
        default=None, description="Host backend only: the memory budget (default: the cgroup "
        "limit, else physical RAM).")

    _guard: VramGuard | None = PrivateAttr(default=None)

    def build(self, log: Any = None) -> VramGuard:
        """A fresh plain guard with this configuration (used by on_start)."""
        limit = self.host_memory_limit_mb * 2**20 if self.host_memory_limit_mb else None
        kwargs = {"log": log} if log is not None else {}
        backend = choose_backend(self.backend, self.device_index, limit, **kwargs)
        return VramGuard(
            backend, Thresholds(self.soft_threshold, self.hard_threshold),
            sample_every=self.sample_every_steps, leak_window=self.leak_window_steps,
            leak_mb_per_1000_steps=self.leak_warn_mb_per_1000_steps,
            fail_on_leak_within_steps=self.fail_on_leak_within_steps, **kwargs,
        )

    def on_start(self, run: StageRun) -> None:
        self._guard = self.build(run.log)
        if run.need_vram_bytes:
            self._guard.preflight(run.need_vram_bytes)
        self._guard.observe()

    def on_batch(self, run: StageRun) -> None:
        assert self._guard is not None, "on_start was not called"
        self._guard.step()

    def on_end(self, run: StageRun) -> dict[str, Any]:
        return self._guard.metadata() if self._guard is not None else {}
