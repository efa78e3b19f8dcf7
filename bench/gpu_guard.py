"""Cost of the VRAM guard per step, for every backend this machine has.

    python bench/gpu_guard.py [--steps 2000]

Prints microseconds per ``VramGuard.step()`` (read, threshold decisions, leak-trend fit)
for sample_every=1 and 10, and that cost as a fraction of a 10 ms model step (target:
under 1%). Imports only ``longrun_dagster.gpu`` (no Dagster), so it runs on a bare GPU box.
"""

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from longrun_dagster.gpu import Thresholds, VramGuard, choose_backend  # noqa: E402

STEP_SECONDS = 0.010


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"{'backend':<12} {'device':<36} {'every':>5} {'us/step':>9} {'% of 10 ms':>10}")
    for kind in ("nvml", "torch", "host"):
        try:
            backend = choose_backend(kind)
        except Exception as exc:  # noqa: BLE001 - a backend this machine lacks
            print(f"{kind:<12} unavailable: {str(exc)[:60]}")
            continue
        for every in (1, 10):
            guard = VramGuard(backend, Thresholds(0.99, 1.0), sample_every=every)
            for _ in range(50):
                guard.step()
            start = time.perf_counter()
            for _ in range(args.steps):
                guard.step()
            per = (time.perf_counter() - start) / args.steps
            print(f"{backend.name:<12} {backend.device[:36]:<36} {every:>5} {per * 1e6:>9.1f} "
                  f"{100 * per / STEP_SECONDS:>9.3f}%")


if __name__ == "__main__":
    main()
