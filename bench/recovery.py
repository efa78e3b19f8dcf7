"""Recovery: a 3-stage pipeline over 20 partitions, killed with kill -9 at the same
progress points, with our stages vs the same models as plain Dagster assets.

    python bench/recovery.py [--partitions 20] [--kills 10] [--batch-ms 20]

Each stage maps a model over 10 batches per partition (``--batch-ms`` of simulated GPU
time each). A driver runs one worker process per partition and SIGKILLs it whenever the
pipeline's total model-call count crosses the next of ``--kills`` kill points (the same
points for both variants), then relaunches the partition:

- longrun: the worker materializes all stages; committed ones are reused, an interrupted
  one resumes from its checkpoint (every 2 batches).
- plain: the same model code as ordinary assets with Dagster's FilesystemIOManager; after
  a kill the partition is re-executed from the failed asset (what Dagster's retries or a
  "re-execute from failure" do): the interrupted asset starts over.

Prints model calls, wall time, and the wasted fraction (calls beyond an uninterrupted run).
"""

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BATCHES = 10
ROWS = 10 * BATCHES
STAGES = ["s1", "s2", "s3"]


def calls(counter: Path) -> int:
    try:
        return counter.stat().st_size  # one byte per model call, appended (O_APPEND)
    except FileNotFoundError:
        return 0


def worker(variant: str, base: str, partition: str, counter: str, done_dir: str) -> None:
    import dagster as dg
    import pandas as pd
    import pandera.pandas as pa

    from longrun_dagster import AtomicObjectStoreIOManager, StageContext, model_stage

    parts = dg.StaticPartitionsDefinition([f"p{i:02d}" for i in range(100)])
    delay = float(os.environ["BATCH_MS"]) / 1000

    def model(batch: pd.DataFrame) -> pd.DataFrame:
        with open(counter, "ab") as f:
            f.write(b"x")
        time.sleep(delay)
        return pd.DataFrame({"id": batch.id.to_numpy(), "x": batch.x.to_numpy() * 2.0})

    @dg.asset(partitions_def=parts)
    def rows(context: dg.AssetExecutionContext) -> pd.DataFrame:
        return pd.DataFrame({"id": [f"{context.partition_key}-{i}" for i in range(ROWS)],
                             "x": [float(i) for i in range(ROWS)]})

    schema = pa.DataFrameSchema({"id": pa.Column(str), "x": pa.Column(float)})
    if variant == "longrun":
        assets: list[Any] = [rows]
        for name in STAGES:
            def fn(batch: pd.DataFrame, stage: StageContext) -> pd.DataFrame:
                return model(batch)
            assets.append(model_stage(upstream=assets[-1], schema=schema, partitions_def=parts,
                                      batch_size=10, checkpoint_every_batches=2,
                                      name=name)(fn))
        io = AtomicObjectStoreIOManager(base_uri=base)
        assert dg.materialize(assets, partition_key=partition,
                              resources={"io_manager": io}).success
        return

    def plain(name: str, upstream: str) -> Any:
        @dg.asset(name=name, partitions_def=parts, ins={"up": dg.AssetIn(upstream)})
        def compute(up: pd.DataFrame) -> pd.DataFrame:
            return pd.concat([model(up.iloc[i:i + 10]) for i in range(0, len(up), 10)],
                             ignore_index=True)
        return compute

    chain = [rows, plain("s1", "rows"), plain("s2", "s1"), plain("s3", "s2")]
    resources = {"io_manager": dg.FilesystemIOManager(base_dir=base)}
    for asset in chain:  # re-execute from the first asset not done
        marker = Path(done_dir) / f"{partition}-{asset.key.to_user_string()}"
        if marker.exists():
            continue
        assert dg.materialize(chain, partition_key=partition, resources=resources,
                              selection=[asset]).success
        marker.touch()


def drive(variant: str, partitions: int, kill_points: list[int], batch_ms: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        counter = Path(tmp) / "calls"
        base = (Path(tmp) / "store").as_uri() if variant == "longrun" else str(Path(tmp) / "fs")
        done = Path(tmp) / "done"
        done.mkdir()
        points = list(kill_points)
        kills, start = 0, time.perf_counter()
        env = {**os.environ, "BATCH_MS": str(batch_ms)}
        for i in range(partitions):
            while True:
                proc = subprocess.Popen(
                    [sys.executable, __file__, "--worker", variant, base, f"p{i:02d}",
                     str(counter), str(done)], env=env, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)
                while proc.poll() is None:
                    if points and calls(counter) >= points[0]:
                        points.pop(0)
                        proc.send_signal(signal.SIGKILL)
                        kills += 1
                    time.sleep(0.005)
                if proc.wait() == 0:
                    break
        return {"calls": calls(counter), "kills": kills, "wall": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--partitions", type=int, default=20)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--batch-ms", type=float, default=20.0)
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    useful = args.partitions * len(STAGES) * BATCHES
    rng = random.Random(7)
    points = sorted(rng.sample(range(5, useful), args.kills))
    print(f"{args.partitions} partitions x {len(STAGES)} stages x {BATCHES} batches = "
          f"{useful} model calls uninterrupted; {args.kills} kill -9 at the same call counts")
    print(f"{'variant':<10} {'kills':>5} {'calls':>6} {'wasted':>7} {'wall s':>7}")
    for variant in ("longrun", "plain"):
        got = drive(variant, args.partitions, points, args.batch_ms)
        wasted = (got["calls"] - useful) / useful
        print(f"{variant:<10} {got['kills']:>5} {got['calls']:>6} {wasted:>7.1%} "
              f"{got['wall']:>7.1f}")


if __name__ == "__main__":
    main()
