"""IO throughput: our IO manager vs Dagster's built-ins vs the raw durable write.

    python bench/io.py [--sizes 16,256,1024] [--repeat 3] [--shard-mb 8] [--no-s3]

Writes and reads one partition of a DataFrame of random float64 (incompressible) through
each IO manager's own handle_output / load_input, on local disk and on a moto S3 server on
loopback, and prints MB/s plus ratios to the physical limit measured in the same run:
`dd conv=fsync` for local disk and a raw boto3 put_object / get_object for S3.

Then, per size and backend, a model stage's commit of an embeddings-like frame (an id and
384 float32 per row, in batches of 256 rows) two ways: "one object" (``attempt.commit``:
the whole frame encoded as one Parquet object, then the record) and "shards" (the
checkpoint shards of ~--shard-mb MiB written during the loop become the committed data
objects; ``attempt.commit_batches`` writes only the tail after the last checkpoint and the
record). Each way's committed frame is then loaded (``PartitionStore.load``: one object,
or the shards read by up to 8 threads and concatenated), and the two frames are checked
equal. Columns: seconds, best of --repeat; "w/c" (written/committed) is the bytes put
(claims, cursors and records included) per byte the committed version names. The "one
object" way here writes no checkpoints; a stage that checkpointed did, on top of it.
"""

import argparse
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import dagster as dg
import numpy as np
import pandas as pd
import pyarrow as pa
from common import best, start_moto
from dagster_aws.s3 import S3PickleIOManager, S3Resource
from upath import UPath

from longrun_dagster import AtomicObjectStoreIOManager
from longrun_dagster.attempt import Committed
from longrun_dagster.commit import PartitionStore
from longrun_dagster.formats import parquet, tables
from longrun_dagster.ledger import Ledger, Plan
from longrun_dagster.manifest import StoredObject
from longrun_dagster.storage import LocalStore, ObjectStore, PutResult

MB = 1024 * 1024
DAYS = dg.DailyPartitionsDefinition(start_date="2024-01-01", end_date="2024-01-03")
DIM = 384  # floats per embedding
BATCH = 256  # rows per batch
ASSET = ["embedded"]


class UPathParquetIOManager(dg.UPathIOManager):
    """What a user writes with Dagster's UPathIOManager base: pandas to_parquet per path."""

    extension = ".parquet"

    def dump_to_path(self, context: dg.OutputContext, obj: pd.DataFrame, path: UPath) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        obj.to_parquet(path)

    def load_from_path(self, context: dg.InputContext, path: UPath) -> pd.DataFrame:
        return pd.read_parquet(path)


def frame(size_mb: int) -> pd.DataFrame:
    cols = 8
    rows = size_mb * MB // (8 * cols)
    rng = np.random.default_rng(0)
    return pd.DataFrame(rng.random((rows, cols)), columns=[f"c{i}" for i in range(cols)])


def contexts(run: str) -> tuple[dg.OutputContext, dg.InputContext]:
    out = dg.build_output_context(asset_key="bench", partition_key="2024-01-01",
                                  asset_partitions_def=DAYS, run_id=run, name="result",
                                  step_key="bench")
    inp = dg.build_input_context(asset_key="bench", partition_key="2024-01-01",
                                 asset_partitions_def=DAYS, upstream_output=out)
    return out, inp


def io_manager_pair(io: Any, data: pd.DataFrame, repeat: int) -> tuple[float, float]:
    if isinstance(io, dg.ConfigurableIOManagerFactory):
        io = io.create_io_manager(dg.build_init_resource_context())
    elif hasattr(io, "setup_for_execution"):
        io.setup_for_execution(dg.build_init_resource_context())
    counter = iter(range(10**6))

    def write() -> None:
        out, _ = contexts(f"run{next(counter)}")
        io.handle_output(out, data)

    write()
    _, inp = contexts("read")
    return best(write, repeat), best(lambda: io.load_input(inp), repeat)


def dd_write(path: Path, size_mb: int, repeat: int) -> float:
    src = path.parent / "dd-src"
    src.write_bytes(os.urandom(size_mb * MB))
    cmd = ["dd", f"if={src}", f"of={path}", "bs=16M", "conv=fsync", "status=none"]
    return best(lambda: subprocess.run(cmd, check=True), repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="16,256", help="partition sizes in MiB")
    parser.add_argument("--repeat", type=int, default=3, help="best of N")
    parser.add_argument("--no-s3", action="store_true")
    parser.add_argument("--shard-mb", type=float, default=8,
                        help="checkpoint shard size in MiB (the commit's data objects)")
    args = parser.parse_args()
    logging.getLogger("dagster").setLevel(logging.WARNING)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(key, "testing")
    moto, endpoint = (None, "") if args.no_s3 else start_moto()
    print(f"{'size':>6} {'target':<34} {'write MB/s':>10} {'read MB/s':>10} "
          f"{'write vs limit':>14} {'read vs limit':>13}")
    sizes = [int(s) for s in args.sizes.split(",")]
    try:
        for size in sizes:
            run_size(size, args.repeat, endpoint)
        print()
        print(f"commit of a stage's output ({DIM} float32 per row, batches of {BATCH} rows, "
              f"shards ~{args.shard_mb:g} MiB), seconds, best of {args.repeat}; checkpoints run "
              "in a background thread during the loop in the product, the shard commit is "
              "what the GPU waits for at the end of a partition")
        print(f"{'size':>6} {'store':<6} {'prep':>6} | {'1-obj commit':>12} {'1-obj read':>10} "
              f"{'w/c':>5} | {'ckpts':>7} {'commit':>7} {'read':>7} {'w/c':>5} {'objects':>7}")
        for size in sizes:
            run_commits(size, args.repeat, endpoint, args.shard_mb)
    finally:
        if moto:
            moto.terminate()


def run_size(size: int, repeat: int, endpoint: str) -> None:
    data = frame(size)
    nbytes = size * MB
    rows: list[tuple[str, float, float, str]] = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        root = Path(tmp)
        limit_w = dd_write(root / "dd-out", size, repeat)
        (root / "dd-out").unlink()
        limit_r = best(lambda: (root / "dd-src").read_bytes(), repeat)
        rows.append(("dd conv=fsync / read_bytes (limit)", limit_w, limit_r, "local"))
        local = {
            "longrun AtomicObjectStoreIOManager": AtomicObjectStoreIOManager(
                base_uri=(root / "lr").as_uri(), gc_grace_seconds=0),
            "dagster FilesystemIOManager (pickle)": dg.FilesystemIOManager(
                base_dir=str(root / "fs")),
            "UPathIOManager + to_parquet": UPathParquetIOManager(UPath(root / "up")),
        }
        for name, io in local.items():
            w, r = io_manager_pair(io, data, repeat)
            rows.append((name, w, r, "local"))
            shutil.rmtree(root / "lr", ignore_errors=True)
        if endpoint:
            rows += s3_rows(endpoint, data, size, repeat)
    limits = {kind: (w, r) for name, w, r, kind in rows if "limit" in name}
    for name, w, r, kind in rows:
        lw, lr = limits[kind]
        print(f"{size:>4}Mi {name + ' [' + kind + ']':<42} {nbytes / w / MB:>10.0f} "
              f"{nbytes / r / MB:>10.0f} {lw / w:>14.2f} {lr / r:>13.2f}")


def s3_rows(endpoint: str, data: pd.DataFrame, size: int, repeat: int
            ) -> list[tuple[str, float, float, str]]:
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    bucket = f"bench-{size}"
    client.create_bucket(Bucket=bucket)
    blob = os.urandom(size * MB)
    raw_w = best(lambda: client.put_object(Bucket=bucket, Key="raw", Body=blob), repeat)
    raw_r = best(lambda: client.get_object(Bucket=bucket, Key="raw")["Body"].read(), repeat)
    resource = S3Resource(endpoint_url=endpoint, region_name="us-east-1")
    ours = AtomicObjectStoreIOManager(base_uri=f"s3://{bucket}/lr", s3=resource,
                                      gc_grace_seconds=0)
    pickled = S3PickleIOManager(s3_resource=resource, s3_bucket=bucket, s3_prefix="pk")
    rows = [("raw boto3 put/get_object (limit)", raw_w, raw_r, "s3")]
    rows.append(("longrun AtomicObjectStoreIOManager", *io_manager_pair(ours, data, repeat),
                 "s3"))
    rows.append(("dagster S3PickleIOManager", *io_manager_pair(pickled, data, repeat), "s3"))
    return rows


# -- one object vs the checkpoint shards as the committed objects -----------------------


def embeddings(size_mb: int) -> pd.DataFrame:
    """An embedding model's output: a string id and DIM random float32 per row."""
    rows = size_mb * MB // (DIM * 4)
    vectors = np.random.default_rng(0).random((rows, DIM), dtype=np.float32)
    return pd.DataFrame({"id": [f"doc-{i:09d}" for i in range(rows)],
                         "embedding": list(vectors)})


def counted(store: ObjectStore) -> list[int]:
    """``store`` with its ``put`` counting bytes into the returned one-item list."""
    total = [0]
    put = store.put

    def counting(key: str, data: bytes | memoryview, **kwargs: Any) -> PutResult:
        result = put(key, data, **kwargs)
        total[0] += result.size
        return result

    store.put = counting  # type: ignore[method-assign]
    return total


@dataclass
class Outcome:
    """What ``commit_batches`` needs of a finished loop (attempt.Batches)."""

    shards: list[tuple[StoredObject, tuple[int, int]]]
    tail: list[pa.Table]
    dtypes: dict[str, str] = field(default_factory=dict)


@dataclass
class Way:
    """Best-of timings of one way to commit, and what it wrote."""

    times: dict[str, float] = field(default_factory=dict)
    written: int = 0
    committed: int = 0
    objects: int = 0
    loaded: pd.DataFrame | None = None

    def time(self, name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = fn()
        took = time.perf_counter() - start
        self.times[name] = min(took, self.times.get(name, took))
        return result


def one_object(store: ObjectStore, data: pd.DataFrame, way: Way) -> None:
    """The old commit: the whole frame encoded as one Parquet object, then the record."""
    written = counted(store)
    partitions = PartitionStore(store)
    attempt = partitions.begin(ASSET, "p", run_id="one", fingerprint="bench")
    attempt.claim()
    result = way.time("commit", lambda: attempt.commit(data))
    assert isinstance(result, Committed)
    _, way.loaded = way.time("read", lambda: partitions.load(ASSET, "p"))
    way.written, way.committed = written[0], result.manifest.size
    way.objects = len(result.manifest.objects_of("data"))


def shards(store: ObjectStore, data: pd.DataFrame, batch_tables: list[pa.Table],
           digests: list[str], per_shard: int, way: Way) -> None:
    """The new commit: checkpoint shards of ``per_shard`` batches written during the loop
    become the data objects; the commit writes the tail after the last one and the
    record."""
    written = counted(store)
    partitions = PartitionStore(store)
    attempt = partitions.begin(ASSET, "p", run_id="shards", fingerprint="bench")
    attempt.claim()
    ckpt = attempt.checkpointer(background=False)
    ledger = Ledger(Plan(len(data), BATCH))

    def loop() -> int:
        saved = 0
        for b, table in enumerate(batch_tables):
            ledger.add(b, table.num_rows, 0, digest=digests[b])
            if (b + 1) % per_shard == 0:
                chunk = batch_tables[saved:b + 1]
                ckpt.save(b + 1, new_shards=[("valid", parquet.dumps_table(tables.concat(chunk)),
                                              sum(t.num_rows for t in chunk))],
                          metadata={"rows_total": len(data), "ledger": ledger.as_json()})
                saved = b + 1
        return saved

    saved = way.time("checkpoints", loop)
    outcome = Outcome(shards=ckpt.shards("valid"), tail=batch_tables[saved:])
    result = way.time("commit", lambda: attempt.commit_batches(ckpt, outcome, ledger=ledger))
    assert isinstance(result, Committed)
    ckpt.close()
    _, way.loaded = way.time("read", lambda: partitions.load(ASSET, "p"))
    way.written, way.committed = written[0], result.manifest.size
    way.objects = len(result.manifest.objects_of("data"))


def run_commits(size: int, repeat: int, endpoint: str, shard_mb: float) -> None:
    data = embeddings(size)
    start = time.perf_counter()
    chunks = [data.iloc[i:i + BATCH] for i in range(0, len(data), BATCH)]
    batch_tables = [tables.table_of(chunk) for chunk in chunks]
    digests = [tables.digest(t) for t in batch_tables]
    prep = time.perf_counter() - start  # in the product: per batch, in the loop
    per_shard = max(1, round(shard_mb * MB / batch_tables[0].nbytes))
    backends: list[tuple[str, Callable[[str], ObjectStore]]] = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        backends.append(("local", lambda name: LocalStore(Path(tmp) / name)))
        if endpoint:
            from longrun_dagster.storage.s3 import S3Store

            client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
            bucket = f"commits-{size}"
            client.create_bucket(Bucket=bucket)
            backends.append(("s3", lambda name: S3Store(client, bucket, name)))
        for backend, open_one in backends:
            old, new = Way(), Way()
            for i in range(repeat):  # fresh stores: no commit reuses or replaces another
                one_object(open_one(f"one-{i}"), data, old)
                shards(open_one(f"shards-{i}"), data, batch_tables, digests, per_shard, new)
            assert old.loaded is not None and new.loaded is not None
            pd.testing.assert_frame_equal(old.loaded, new.loaded)
            assert old.loaded["id"].tolist() == data["id"].tolist()
            print(f"{size:>4}Mi {backend:<6} {prep:>6.2f} | {old.times['commit']:>12.3f} "
                  f"{old.times['read']:>10.3f} {old.written / old.committed:>5.2f} | "
                  f"{new.times['checkpoints']:>7.3f} {new.times['commit']:>7.3f} "
                  f"{new.times['read']:>7.3f} {new.written / new.committed:>5.2f} "
                  f"{new.objects:>7}")


if __name__ == "__main__":
    main()
