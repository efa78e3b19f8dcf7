"""Per-step overheads of a model stage: checkpoints, heartbeats, the VRAM guard.

    python bench/overheads.py [--batches 200] [--step-ms 10]

Runs the stage's batch loop (no Dagster) over ``--batches`` batches of 256 rows whose
output is a 384-float embedding per row, each batch taking ``--step-ms`` of simulated GPU
time, with checkpoints every 1, 10 and 50 batches and never; prints the wall time, the
cost per checkpoint and its fraction of the run. Then the cost per call of
``Watchdog.progress`` (heartbeat) and ``VramGuard.step`` (host backend).
"""

import argparse
import logging
import tempfile
import time

import numpy as np
import pandas as pd
import pandera.pandas as pa
from common import best

from longrun_dagster.batches import BatchLoop, Cadence
from longrun_dagster.checkpoint import Checkpointer
from longrun_dagster.gpu import Thresholds, VramGuard, choose_backend
from longrun_dagster.heartbeat import Watchdog
from longrun_dagster.storage import LocalStore

SCHEMA = pa.DataFrameSchema({"id": pa.Column(str), "embedding": pa.Column(object)})


def run_loop(frame: pd.DataFrame, every: int, step_s: float) -> tuple[float, int]:
    def model(batch: pd.DataFrame, index: int) -> pd.DataFrame:
        time.sleep(step_s)
        vectors = np.random.default_rng(index).random((len(batch), 384), dtype=np.float32)
        return pd.DataFrame({"id": batch.id.to_numpy(), "embedding": list(vectors)})

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Checkpointer(LocalStore(tmp), "a/p=x/_checkpoints/f", background=True)
        loop = BatchLoop(model, frame, batch_size=256, schema=SCHEMA, checkpointer=ckpt,
                         cadence=Cadence(every_batches=every, every_seconds=1e9,
                                         progress_every_seconds=1e9))
        start = time.perf_counter()
        loop.run()
        return time.perf_counter() - start, ckpt.saves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--step-ms", type=float, default=10.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = args.batches * 256
    frame = pd.DataFrame({"id": [f"r{i}" for i in range(rows)]})
    step = args.step_ms / 1000
    base, _ = run_loop(frame, 10**9, step)
    print(f"{args.batches} batches x 256 rows (384 floats each), {args.step_ms:.0f} ms/step; "
          f"no checkpoint until the end: {base:.2f} s")
    print(f"{'every':>6} {'saves':>6} {'wall s':>8} {'ms/save':>8} {'of wall':>8}")
    for every in (1, 10, 50):
        wall, saves = run_loop(frame, every, step)
        extra = max(wall - base, 0.0)
        print(f"{every:>6} {saves:>6} {wall:>8.2f} {extra / max(saves - 1, 1) * 1e3:>8.1f} "
              f"{extra / wall:>7.1%}")
    dog = Watchdog(lambda at, c: None, interval=30, stall_timeout=900, enforce=False)
    per = best(lambda: [dog.progress(batches_done=i) for i in range(10000)]) / 10000
    print(f"heartbeat progress(): {per * 1e6:.2f} us/step ({per / step:.4%} of a step)")
    guard = VramGuard(choose_backend("host"), Thresholds(0.99, 1.0))
    per = best(lambda: [guard.step() for _ in range(1000)]) / 1000
    print(f"VRAM guard step() (host backend, every step): {per * 1e6:.1f} us "
          f"({per / step:.3%} of a step)")


if __name__ == "__main__":
    main()
