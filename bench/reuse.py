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

    python bench/reuse.py --overlap [--computed 100] [--rows 2048] [--model-ms 10] [--repeat 3]

``--overlap`` measures instead a range run of ``--computed`` partitions that all compute
(nothing committed before) with ``longrun_dagster.stage.OVERLAP_COMMITS`` False ("old":
each partition committed before the next computes) and True ("new": partition k commits
in a background thread while k+1 computes), interleaved old, new, old, new...
``--repeat`` times, after an untimed warm-up range run of each over two partitions (the
process's first runs pay one-time costs). Each run has its own fresh base URI
(``file://``, a temporary folder) and its own in-memory Dagster instance; the upstream
``ids`` (``--rows`` per partition) are committed first by one range run, not timed. The
timed part is the stage's range run alone (``dg.materialize`` with ``selection=[stage]``
and the range tags). The stage embeds each row as 384 float32 (deterministic per
partition and batch), batches of 256, a checkpoint every 4 batches, ``--model-ms`` of
simulated GPU time per batch (a sleep, which releases the GIL as a CUDA call does;
default 10 ms here). Per variant: best and median wall, model time (batches x model-ms)
/ wall, and new/old. Asserts that every run committed every partition, with the same
content version (``data_version``) per partition in both variants.
"""

import argparse
import logging
import shutil
import statistics
import tempfile
import time
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
import pandera.pandas as pa
import torch

import longrun_dagster.stage as stage_module
from longrun_dagster import AtomicObjectStoreIOManager, StageContext, model_stage

CALLS = [0]
LOADS = [0]
RANGE_START = "dagster/asset_partition_range_start"
RANGE_END = "dagster/asset_partition_range_end"
EMBED_SCHEMA = pa.DataFrameSchema({"id": pa.Column(str), "embedding": pa.Column(object)})
EMBED_BATCH = 256
EMBED_DIM = 384


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


def build_embedder(n: int, rows_per_partition: int, model_ms: float) -> tuple[Any, Any]:
    """``ids`` (``rows_per_partition`` per partition) and ``embedded``, a stage that embeds
    each row as 384 float32, deterministic per partition and batch (so both variants
    commit the same content)."""
    parts = dg.StaticPartitionsDefinition([f"p{i:05d}" for i in range(n)])

    @dg.asset(partitions_def=parts, backfill_policy=dg.BackfillPolicy.single_run())
    def ids(context: dg.AssetExecutionContext) -> dict[str, pd.DataFrame]:
        return {key: pd.DataFrame({"id": [f"{key}-{i}" for i in range(rows_per_partition)]})
                for key in context.partition_keys}

    @model_stage(upstream=ids, schema=EMBED_SCHEMA, partitions_def=parts,
                 batch_size=EMBED_BATCH, checkpoint_every_batches=4,
                 backfill_policy=dg.BackfillPolicy.single_run())
    def embedded(batch: pd.DataFrame, stage: StageContext) -> pd.DataFrame:
        CALLS[0] += 1
        time.sleep(model_ms / 1000)
        seed = int(str(stage.partition_key)[1:]) * 1_000_003 + stage.batch_index
        vectors = np.random.default_rng(seed).random((len(batch), EMBED_DIM),
                                                     dtype=np.float32)
        return pd.DataFrame({"id": batch.id.to_numpy(), "embedding": list(vectors)})

    return ids, embedded


def overlap_once(ids: Any, embedded: Any, keys: list[str], overlap: bool
                 ) -> tuple[float, int, dict[str, str], int]:
    """One timed range run of ``embedded`` over ``keys`` (all computing) with
    ``OVERLAP_COMMITS = overlap``, on a fresh base URI and in-memory instance. Returns the
    wall, the model calls, each partition's content version and the bytes committed."""
    tmp = tempfile.mkdtemp(prefix="reuse-overlap-")
    saved = stage_module.OVERLAP_COMMITS
    try:
        io = AtomicObjectStoreIOManager(base_uri=f"file://{tmp}/lr")
        instance = dg.DagsterInstance.ephemeral()
        range_run([ids, embedded], [ids], io, keys[0], keys[-1], instance)
        store = io.partition_store()
        assert all(store.lookup(["embedded"], key) is None for key in keys)
        stage_module.OVERLAP_COMMITS = overlap
        CALLS[0] = 0
        wall = range_run([ids, embedded], [embedded], io, keys[0], keys[-1], instance)
        calls = CALLS[0]
        manifests = {key: store.lookup(["embedded"], key) for key in keys}
        missing = [key for key, manifest in manifests.items() if manifest is None]
        assert not missing, f"overlap={overlap}: not committed: {missing[:5]}"
        versions = {key: m.data_version for key, m in manifests.items() if m is not None}
        size = sum(m.size for m in manifests.values() if m is not None)
        return wall, calls, versions, size
    finally:
        stage_module.OVERLAP_COMMITS = saved
        shutil.rmtree(tmp, ignore_errors=True)


def overlap_main(computed: int, rows_per_partition: int, model_ms: float, repeat: int) -> None:
    ids, embedded = build_embedder(computed, rows_per_partition, model_ms)
    keys = [f"p{i:05d}" for i in range(computed)]
    batches = computed * -(-rows_per_partition // EMBED_BATCH)
    model_s = batches * model_ms / 1000
    print(f"range run of {computed} partitions, all computing, {rows_per_partition} rows each "
          f"({EMBED_DIM} float32 per row), batch {EMBED_BATCH}, checkpoint every 4 batches, "
          f"{model_ms:g} ms simulated model time per batch: {batches} batches, model time "
          f"{model_s:.2f} s; fresh file:// base URI and in-memory Dagster instance per run; "
          f"OVERLAP_COMMITS False (old) / True (new) interleaved, {repeat} runs each, after an "
          f"untimed warm-up run of each over {min(2, computed)} partition(s)")
    variants = {"old": False, "new": True}
    for overlap in variants.values():  # the process's first runs pay one-time costs
        overlap_once(ids, embedded, keys[:2], overlap)
    walls: dict[str, list[float]] = {name: [] for name in variants}
    versions: dict[str, str] = {}
    for turn in range(repeat):
        for name, overlap in variants.items():
            wall, calls, got, size = overlap_once(ids, embedded, keys, overlap)
            assert calls == batches, f"{name}: {calls} model calls, expected {batches}"
            if not versions:
                versions = got
            differ = [key for key in keys if got[key] != versions[key]]
            assert not differ, f"{name} run {turn + 1}: content versions differ: {differ[:5]}"
            walls[name].append(wall)
            print(f"  run {turn + 1} {name} (OVERLAP_COMMITS={overlap}): {wall:.2f} s, "
                  f"model/wall {model_s / wall:.2f}, committed {size / 1e6:.1f} MB", flush=True)
    print(f"every run committed all {computed} partitions; content versions equal across "
          f"variants and runs")
    print("| variant | OVERLAP_COMMITS | best s | median s | model/wall (best) | "
          "model/wall (median) | new/old best | new/old median |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    best_of = {name: min(w) for name, w in walls.items()}
    median_of = {name: statistics.median(w) for name, w in walls.items()}
    for name, overlap in variants.items():
        ratios = (f"{best_of[name] / best_of['old']:.3f} | "
                  f"{median_of[name] / median_of['old']:.3f}" if name == "new" else " | ")
        print(f"| {name} | {overlap} | {best_of[name]:.2f} | {median_of[name]:.2f} | "
              f"{model_s / best_of[name]:.2f} | {model_s / median_of[name]:.2f} | {ratios} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--partitions", type=int, default=1000)
    parser.add_argument("--model-ms", type=float, default=None,
                        help="simulated model time: per partition (default 50), or with "
                             "--overlap per batch (default 10)")
    parser.add_argument("--per-partition-sample", type=int, default=100)
    parser.add_argument("--overlap", action="store_true",
                        help="range run of --computed partitions, all computing, "
                             "OVERLAP_COMMITS False vs True interleaved")
    parser.add_argument("--computed", type=int, default=100)
    parser.add_argument("--rows", type=int, default=2048, help="rows per partition (--overlap)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per variant (--overlap)")
    args = parser.parse_args()
    logging.getLogger("dagster").setLevel(logging.WARNING)
    if args.overlap:
        overlap_main(args.computed, args.rows,
                     10.0 if args.model_ms is None else args.model_ms, args.repeat)
        return
    if args.model_ms is None:
        args.model_ms = 50.0
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
