"""Reuse: a backfill over N partitions of which 90% are committed, vs a backfill of only
the missing 10%, as range runs (``BackfillPolicy.single_run()``) and as one run per
partition; model loads per run.

    python bench/reuse.py [--partitions 1000] [--model-ms 50] [--per-partition-sample 100]

All runs share one Dagster instance, so the figures measure the stage, not instance
creation: an in-memory one (the stage's own cost), then a SQLite one (a laptop's
``dagster dev``; every event is a database write). The model is a small torch MLP plus
``--model-ms`` of simulated GPU time per partition; ``setup`` (the model load) sleeps
0.5 s, as loading real weights does. The missing 10% are the last partitions, so either
backfill is one range. One-run-per-partition figures are timed on a sample and scaled.
"""

import argparse
import logging
import shutil
import tempfile
import time
from typing import Any

import dagster as dg
import pandas as pd
import pandera.pandas as pa
import torch

from longrun_dagster import AtomicObjectStoreIOManager, StageContext, model_stage

CALLS = [0]
LOADS = [0]
RANGE_START = "dagster/asset_partition_range_start"
RANGE_END = "dagster/asset_partition_range_end"


def build(n: int, model_ms: float) -> tuple[Any, Any]:
    parts = dg.StaticPartitionsDefinition([f"p{i:05d}" for i in range(n)])

    @dg.asset(partitions_def=parts, backfill_policy=dg.BackfillPolicy.single_run())
    def rows(context: dg.AssetExecutionContext) -> dict[str, pd.DataFrame]:
        return {key: pd.DataFrame({"id": [f"{key}-{i}" for i in range(32)],
                                   "x": [float(i) for i in range(32)]})
                for key in context.partition_keys}

    class Out(pa.DataFrameModel):
        id: str
        y: float

    def setup(stage: StageContext) -> torch.nn.Module:
        LOADS[0] += 1
        time.sleep(0.5)
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.ReLU(),
                                   torch.nn.Linear(16, 1))

    @model_stage(upstream=rows, schema=Out, partitions_def=parts, batch_size=32, setup=setup,
                 backfill_policy=dg.BackfillPolicy.single_run())
    def scores(batch: pd.DataFrame, stage: StageContext) -> pd.DataFrame:
        CALLS[0] += 1
        time.sleep(model_ms / 1000)
        with torch.no_grad():
            y = stage.state(torch.tensor(batch.x.to_numpy(), dtype=torch.float32)
                            .unsqueeze(1)).squeeze(1).double().numpy()
        return pd.DataFrame({"id": batch.id.to_numpy(), "y": y})

    return rows, scores


def range_run(assets: list[Any], selection: list[Any], io: Any, first: str, last: str,
              instance: dg.DagsterInstance) -> float:
    start = time.perf_counter()
    result = dg.materialize(assets, selection=selection, resources={"io_manager": io},
                            instance=instance, tags={RANGE_START: first, RANGE_END: last})
    assert result.success
    return time.perf_counter() - start


def per_partition(assets: list[Any], keys: list[str], io: Any,
                  instance: dg.DagsterInstance) -> float:
    start = time.perf_counter()
    for key in keys:
        result = dg.materialize(assets, partition_key=key, resources={"io_manager": io},
                                selection=[assets[1]], instance=instance)
        assert result.success
    return time.perf_counter() - start


def forget(io: AtomicObjectStoreIOManager, keys: list[str]) -> None:
    """Make partitions missing again (their manifests go; GC takes the rest)."""
    store = io.partition_store()
    for key in keys:
        store.store.delete(store.prefix(["scores"], key) + "_manifest.json")


def measure(instance: dg.DagsterInstance, rows: Any, scores: Any, keys: list[str],
            sample_size: int, tmp: str) -> dict[str, float]:
    missing = keys[-(len(keys) // 10):]
    io = AtomicObjectStoreIOManager(base_uri=f"file://{tmp}/a")
    range_run([rows, scores], [rows, scores], io, keys[0], keys[-1], instance)
    forget(io, missing)
    CALLS[0] = LOADS[0] = 0
    got: dict[str, float] = {}
    got["full"] = range_run([rows, scores], [scores], io, keys[0], keys[-1], instance)
    got["full_calls"], got["full_loads"] = CALLS[0], LOADS[0]
    forget(io, missing)
    CALLS[0] = LOADS[0] = 0
    got["only"] = range_run([rows, scores], [scores], io, missing[0], missing[-1], instance)
    got["only_calls"], got["only_loads"] = CALLS[0], LOADS[0]
    sample = keys[:sample_size]
    got["reused_each"] = per_partition([rows, scores], sample, io, instance) / len(sample)
    forget(io, sample)
    LOADS[0] = 0
    got["computed_each"] = per_partition([rows, scores], sample, io, instance) / len(sample)
    got["per_loads"] = LOADS[0] / len(sample)
    return got


def report(name: str, got: dict[str, float], n: int, sample: int) -> None:
    missing = n // 10
    committed = n - missing
    per_full = committed * got["reused_each"] + missing * got["computed_each"]
    per_only = missing * got["computed_each"]
    print(f"\n{name} instance, shared by every run")
    print("| backfill | runs | wall s | model calls | model loads |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(f"| range run over all {n} (reuse) | 1 | {got['full']:.1f} | "
          f"{got['full_calls']:.0f} | {got['full_loads']:.0f} |")
    print(f"| range run of the missing {missing} | 1 | {got['only']:.1f} | "
          f"{got['only_calls']:.0f} | {got['only_loads']:.0f} |")
    print(f"| one run per partition, all {n} (scaled from {sample}) | {n} | {per_full:.1f} | "
          f"{missing} | {got['per_loads'] * missing:.0f} |")
    print(f"| one run per partition, missing {missing} (scaled) | {missing} | {per_only:.1f} | "
          f"{missing} | {got['per_loads'] * missing:.0f} |")
    print(f"range runs: all/missing-only {got['full'] / got['only']:.2f}x (target <= 1.2x); "
          f"per reused partition {(got['full'] - got['only']) / committed * 1e3:.1f} ms")
    print(f"one run per partition: all/missing-only {per_full / per_only:.2f}x; per reused "
          f"partition {got['reused_each'] * 1e3:.0f} ms, per computed "
          f"{got['computed_each'] * 1e3:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--partitions", type=int, default=1000)
    parser.add_argument("--model-ms", type=float, default=50.0)
    parser.add_argument("--per-partition-sample", type=int, default=100)
    args = parser.parse_args()
    logging.getLogger("dagster").setLevel(logging.WARNING)
    n = args.partitions
    rows, scores = build(n, args.model_ms)
    keys = [f"p{i:05d}" for i in range(n)]
    print(f"partitions {n}, committed {n - n // 10}, missing {n // 10} (the last ones), "
          f"simulated model time {args.model_ms:.0f} ms/partition, model load 0.5 s")
    for name in ("in-memory", "SQLite"):
        tmp = tempfile.mkdtemp()
        try:
            if name == "in-memory":
                got = measure(dg.DagsterInstance.ephemeral(), rows, scores, keys,
                              args.per_partition_sample, tmp)
            else:
                with dg.instance_for_test(temp_dir=tmp) as instance:
                    got = measure(instance, rows, scores, keys, args.per_partition_sample, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        report(name, got, n, args.per_partition_sample)


if __name__ == "__main__":
    main()
