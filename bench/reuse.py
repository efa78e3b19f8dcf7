"""Reuse: a backfill over N partitions of which 90% are committed, vs a backfill of only
the missing 10%, vs recomputing everything (what plain Dagster assets do).

    python bench/reuse.py [--partitions 1000] [--model-ms 50]

Each partition runs as its own in-process ``materialize()`` (as a backfill launches one run
per partition). The model is a small torch MLP plus ``--model-ms`` of simulated GPU time
per partition. Prints wall times, model calls and ratios measured in this one run.
"""

import argparse
import logging
import tempfile
import time
from typing import Any

import dagster as dg
import pandas as pd
import pandera.pandas as pa
import torch

from longrun_dagster import AtomicObjectStoreIOManager, StageContext, model_stage

CALLS = [0]


def build(n: int, model_ms: float) -> tuple[Any, Any]:
    parts = dg.StaticPartitionsDefinition([f"p{i:05d}" for i in range(n)])

    @dg.asset(partitions_def=parts)
    def rows(context: dg.AssetExecutionContext) -> pd.DataFrame:
        return pd.DataFrame({"id": [f"{context.partition_key}-{i}" for i in range(32)],
                             "x": [float(i) for i in range(32)]})

    class Out(pa.DataFrameModel):
        id: str
        y: float

    def setup(stage: StageContext) -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.ReLU(),
                                   torch.nn.Linear(16, 1))

    @model_stage(upstream=rows, schema=Out, partitions_def=parts, batch_size=32, setup=setup)
    def scores(batch: pd.DataFrame, stage: StageContext) -> pd.DataFrame:
        CALLS[0] += 1
        time.sleep(model_ms / 1000)
        with torch.no_grad():
            y = stage.state(torch.tensor(batch.x.to_numpy(), dtype=torch.float32)
                            .unsqueeze(1)).squeeze(1).double().numpy()
        return pd.DataFrame({"id": batch.id.to_numpy(), "y": y})

    return rows, scores


def backfill(assets: list[Any], keys: list[str], io: Any, selection: list[Any]) -> float:
    start = time.perf_counter()
    for key in keys:
        result = dg.materialize(assets, partition_key=key, resources={"io_manager": io},
                                selection=selection)
        assert result.success
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--partitions", type=int, default=1000)
    parser.add_argument("--model-ms", type=float, default=50.0)
    args = parser.parse_args()
    logging.getLogger("dagster").setLevel(logging.WARNING)
    n = args.partitions
    rows, scores = build(n, args.model_ms)
    keys = [f"p{i:05d}" for i in range(n)]
    missing = keys[::10]  # 10% spread across the range
    with tempfile.TemporaryDirectory() as tmp:
        io = AtomicObjectStoreIOManager(base_uri=f"file://{tmp}/a")
        io_missing = AtomicObjectStoreIOManager(base_uri=f"file://{tmp}/b")
        for store in (io, io_missing):
            backfill([rows], keys, store, [rows])
            backfill([rows, scores], [k for k in keys if k not in set(missing)], store,
                     [scores])
        CALLS[0] = 0
        full = backfill([rows, scores], keys, io, [scores])
        full_calls = CALLS[0]
        CALLS[0] = 0
        only = backfill([rows, scores], missing, io_missing, [scores])
        only_calls = CALLS[0]
    per_computed = only / len(missing)
    print(f"partitions {n}, committed {n - len(missing)}, missing {len(missing)}, "
          f"simulated model time {args.model_ms:.0f} ms/partition")
    print(f"backfill over all {n} (reuse):      {full:7.1f} s, model calls {full_calls}")
    print(f"backfill of the missing {len(missing)} only: {only:7.1f} s, model calls "
          f"{only_calls}")
    print(f"ratio all/missing-only: {full / only:.2f}x; per reused partition "
          f"{(full - only) / (n - len(missing)) * 1e3:.0f} ms; per computed partition "
          f"{per_computed * 1e3:.0f} ms; recomputing all {n} would take ~"
          f"{per_computed * n:.0f} s ({per_computed * n / full:.1f}x the reuse backfill)")


if __name__ == "__main__":
    main()
