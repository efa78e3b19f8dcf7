"""IO throughput: our IO manager vs Dagster's built-ins vs the raw durable write.

    python bench/io.py [--sizes 16,256,1024] [--repeat 3]

Writes and reads one partition of a DataFrame of random float64 (incompressible) through
each IO manager's own handle_output / load_input, on local disk and on a moto S3 server on
loopback, and prints MB/s plus ratios to the physical limit measured in the same run:
`dd conv=fsync` for local disk and a raw boto3 put_object / get_object for S3.
"""

import argparse
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import boto3
import dagster as dg
import numpy as np
import pandas as pd
from common import best, start_moto
from dagster_aws.s3 import S3PickleIOManager, S3Resource
from upath import UPath

from longrun_dagster import AtomicObjectStoreIOManager

MB = 1024 * 1024
DAYS = dg.DailyPartitionsDefinition(start_date="2024-01-01", end_date="2024-01-03")


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
    args = parser.parse_args()
    logging.getLogger("dagster").setLevel(logging.WARNING)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(key, "testing")
    moto, endpoint = (None, "") if args.no_s3 else start_moto()
    print(f"{'size':>6} {'target':<34} {'write MB/s':>10} {'read MB/s':>10} "
          f"{'write vs limit':>14} {'read vs limit':>13}")
    try:
        for size in [int(s) for s in args.sizes.split(",")]:
            run_size(size, args.repeat, endpoint)
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


if __name__ == "__main__":
    main()
