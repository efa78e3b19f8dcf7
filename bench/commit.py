"""The partition commit protocol and the reuse check, before and after a redesign.

    python bench/commit.py --old-root /tmp/lr-old [--new-root .] [--n 30] [--rounds 3]

``--old-root`` is a checkout of the old code (e.g. ``git worktree add /tmp/lr-old 4390003``).
Each implementation is imported in its own subprocess (``PYTHONPATH`` = its root); the parent
runs old, new, old, new (``--rounds``) on local disk (a temporary directory) and on a moto S3
server on loopback, pools the samples and prints medians with the new/old ratio.

What a model stage does, per partition (64 KiB data object + 1 KiB quarantine object):
  old  current() [+ check_sizes() if the fingerprint matches] + take_lease()
       + commit(expect=token, generation=...) + the stage's checkpoint clean-up (one list)
  new  begin() + reusable() + claim() + commit_objects() (clean-up and GC are inside)
on a never-committed partition ("fresh") and on one committed with another fingerprint
("replace"); the reuse check of a committed partition: old current() + check_sizes(), new
begin() + reusable(); and a 64 MiB data object through the same path (MB/s).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

MB = 1024 * 1024
SMALL = os.urandom(64 * 1024)
QUARANTINE = os.urandom(1024)


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# -- child: one implementation on one backend ------------------------------------------------


def make_store(backend: str, endpoint: str | None, tmp: str) -> Any:
    from longrun_dagster.storage import LocalStore, S3Store

    if backend == "local":
        return LocalStore(tmp)
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    bucket = f"b-{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=bucket)
    return S3Store(client, bucket, "lr")


def count_calls(store: Any) -> dict[str, int]:
    """Count the store operations (one request each on S3; big objects aside)."""
    calls: dict[str, int] = {}

    def counted(name: str) -> Callable[..., Any]:
        inner = getattr(store, name)

        def wrapped(*a: Any, **k: Any) -> Any:
            calls[name] = calls.get(name, 0) + 1
            return inner(*a, **k)
        return wrapped

    for name in ("get", "put", "stat", "list", "delete"):
        setattr(store, name, counted(name))
    return calls


def old_paths(partitions: Any) -> tuple[Callable[..., None], Callable[..., None]]:
    def stage(part: str, fp: str, objects: dict[str, tuple[bytes, str]]) -> None:
        asset = ["stage"]
        current = partitions.current(asset, part)
        committed = current.manifest
        if committed is not None and committed.fingerprint == fp:
            partitions.check_sizes(committed)  # (never here: the fingerprints differ)
        generation = partitions.take_lease(asset, part, "bench")
        partitions.commit(asset, part, objects, format="bytes", rows=1, run_id="bench",
                          fingerprint=fp, generation=generation, expect=current.token)
        for info in partitions.store.list(partitions.prefix(asset, part) + "_checkpoints/"):
            partitions.store.delete(info.key)

    def reuse(part: str, fp: str) -> None:
        manifest = partitions.current(["stage"], part).manifest
        assert manifest is not None and manifest.fingerprint == fp
        assert not partitions.check_sizes(manifest)

    return stage, reuse


def new_paths(partitions: Any) -> tuple[Callable[..., None], Callable[..., None]]:
    def stage(part: str, fp: str, objects: dict[str, tuple[bytes, str]]) -> None:
        attempt = partitions.begin(["stage"], part, run_id="bench", fingerprint=fp)
        assert attempt.reusable() is None
        attempt.claim()
        attempt.commit_objects(objects, format="bytes", rows=1)

    def reuse(part: str, fp: str) -> None:
        attempt = partitions.begin(["stage"], part, run_id="bench", fingerprint=fp)
        assert attempt.reusable() is not None

    return stage, reuse


def child(args: argparse.Namespace) -> None:
    import longrun_dagster
    from longrun_dagster.commit import PartitionStore

    root = Path(os.environ["PYTHONPATH"]).resolve()
    assert Path(longrun_dagster.__file__).resolve().is_relative_to(root), longrun_dagster.__file__
    small = {"data": (SMALL, "bin"), "quarantine": (QUARANTINE, "bin")}
    with tempfile.TemporaryDirectory() as tmp:
        partitions = PartitionStore(make_store(args.backend, args.endpoint, tmp))
        stage, reuse = (old_paths if args.impl == "old" else new_paths)(partitions)
        n = args.n
        stage("warm", "w", small)  # connections, imports
        fresh = [timed(lambda i=i: stage(f"fresh{i:04d}", "f1", small)) for i in range(n)]
        for i in range(n):  # committed with another fingerprint, replaced below
            partitions.commit(["stage"], f"rep{i:04d}", small, format="bytes", rows=1,
                              run_id="setup", fingerprint="f0")
        replace = [timed(lambda i=i: stage(f"rep{i:04d}", "f1", small)) for i in range(n)]
        check = [timed(lambda i=i: reuse(f"rep{i % n:04d}", "f1")) for i in range(2 * n)]
        calls = count_calls(partitions.store)
        ops = {}
        for key, op in (("fresh", lambda: stage("cfresh", "f1", small)),
                        ("replace", lambda: stage("rep0000", "f2", small)),
                        ("reuse", lambda: reuse("rep0000", "f2"))):
            calls.clear()
            op()
            ops[key] = sum(calls.values())
        big = {"data": (os.urandom(64 * MB), "bin")}
        big_s = [timed(lambda i=i: stage(f"big{i}", "f1", big)) for i in range(args.big)]
        if args.backend == "s3":  # moto keeps objects in memory: free them for later runs
            for info in partitions.store.list(""):
                partitions.store.delete(info.key)
    print(json.dumps({"fresh": fresh, "replace": replace, "reuse": check,
                      "big_mbps": [64 / s for s in big_s],
                      "ops": ops}))


# -- parent ----------------------------------------------------------------------------------


def run_child(impl: str, root: str, backend: str, endpoint: str, args: argparse.Namespace
              ) -> dict[str, list[float]]:
    env = dict(os.environ, PYTHONPATH=str(Path(root).resolve()))
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.setdefault(key, "testing")
    env.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    cmd = [sys.executable, __file__, "--impl", impl, "--backend", backend, "--endpoint",
           endpoint, "--n", str(args.n), "--big", str(args.big)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old-root", default="/tmp/lr-old")
    parser.add_argument("--new-root", default=str(Path(__file__).resolve().parent.parent))
    parser.add_argument("--n", type=int, default=30, help="small commits per kind per run")
    parser.add_argument("--big", type=int, default=2, help="64 MiB commits per run")
    parser.add_argument("--rounds", type=int, default=3, help="old, new pairs per backend")
    parser.add_argument("--no-s3", action="store_true")
    parser.add_argument("--impl", choices=["old", "new"], help=argparse.SUPPRESS)
    parser.add_argument("--backend", choices=["local", "s3"], help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.impl:
        child(args)
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import start_moto

    roots = {"old": args.old_root, "new": args.new_root}
    backends = ["local"] if args.no_s3 else ["local", "s3"]
    samples: dict[tuple[str, str], dict[str, list[float]]] = {}
    ops: dict[str, Any] = {}
    proc, endpoint = (None, "") if args.no_s3 else start_moto()
    try:
        for backend in backends:
            for _ in range(args.rounds):
                for impl in ("old", "new"):
                    got = run_child(impl, roots[impl], backend, endpoint, args)
                    into = samples.setdefault((backend, impl), {})
                    ops[impl] = got.pop("ops")
                    for key, values in got.items():
                        into.setdefault(key, []).extend(values)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)

    rows = [("fresh", "stage commit, fresh partition (ms)"),
            ("replace", "stage commit, replaces a committed one (ms)"),
            ("reuse", "reuse check of a committed partition (ms)"),
            ("big_mbps", "stage commit, 64 MiB data object (MB/s)")]
    print(f"{args.rounds} rounds (old, new interleaved); small commits: {args.n} per kind per "
          f"round, reuse checks: {2 * args.n}, 64 MiB commits: {args.big}; medians")
    print("| store | measure | old | new | new/old |\n| --- | --- | ---: | ---: | ---: |")
    for backend in backends:
        for key, label in rows:
            scale = 1.0 if key == "big_mbps" else 1e3
            old = statistics.median(samples[(backend, "old")][key]) * scale
            new = statistics.median(samples[(backend, "new")][key]) * scale
            print(f"| {backend} | {label} | {old:.2f} | {new:.2f} | {new / old:.2f} |")
    for key, label in rows[:3]:
        print(f"| any | store operations: {label[:-5]} | {ops['old'][key]} | {ops['new'][key]} "
              f"| {ops['new'][key] / ops['old'][key]:.2f} |")


if __name__ == "__main__":
    main()
