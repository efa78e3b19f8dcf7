"""Scale: the reuse check (one manifest read + a stat per object) and garbage collection
as the number of committed partitions grows, on local disk and on a moto S3 server.

    python bench/scale.py [--sizes 10,100,1000,10000] [--no-s3]

The stalled-run sensor's growth with running runs is in ``sensor_tick.py``.
"""

import argparse
import os
import tempfile

import boto3
from common import best, start_moto

from longrun_dagster.commit import PartitionStore
from longrun_dagster.storage import LocalStore, ObjectStore, S3Store


def fill(store: ObjectStore, n: int, start: int) -> None:
    partitions = PartitionStore(store)
    for i in range(start, n):
        partitions.commit(["stage"], f"p{i:06d}", {"data": (b"x" * 256, "bin")},
                          format="bytes", rows=1, run_id="fill", fingerprint=f"f{i}")


def measure(store: ObjectStore, label: str, sizes: list[int]) -> None:
    partitions = PartitionStore(store)
    done = 0
    for n in sizes:
        fill(store, n, done)
        done = n
        print(f"{label:<6} {n:>7} {reuse_check_ms(partitions, n):>14.2f} "
              f"{best(lambda: partitions.collect_garbage(['stage']), 1) * 1e3:>12.0f}")


def reuse_check_ms(partitions: PartitionStore, n: int) -> float:
    """What a model stage does before reusing a partition: read its manifest, compare the
    fingerprint, and stat the objects it names (missing or cut short -> recompute)."""
    probe, fingerprint = f"p{n // 2:06d}", f"f{n // 2}"

    def check() -> None:
        manifest = partitions.current(["stage"], probe).manifest
        assert manifest is not None and manifest.fingerprint == fingerprint
        assert not partitions.check_sizes(manifest)

    return best(check, 20) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="10,100,1000,10000")
    parser.add_argument("--no-s3", action="store_true")
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    print(f"{'store':<6} {'partitions':>7} {'reuse check ms':>14} {'full GC ms':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        measure(LocalStore(tmp), "local", sizes)
    if args.no_s3:
        return
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(key, "testing")
    proc, endpoint = start_moto()
    try:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket="scale")
        measure(S3Store(client, "scale", "lr"), "s3", sizes)
    finally:
        proc.terminate()


if __name__ == "__main__":
    main()
