"""A partition writer in its own process, announcing each put so a test can kill it there.

    python -m tests.helpers.writer '<json spec>'

spec: {"store": {...}, "asset": [...], "partition": str, "size": int, "seed": int,
       "pause_before": "data"|"manifest"|null, "release": path|null}
Prints ``BEGIN data``, ``END data``, ``BEGIN manifest``, ``END manifest``, ``COMMITTED``.
With ``pause_before``, prints ``PAUSED`` and waits there (forever, or until the ``release``
file exists). Exit code 3 on ``CommitConflict``.
"""

import json
import os
import sys
import time
from typing import Any

import boto3

from longrun_dagster.commit import MANIFEST, PartitionStore
from longrun_dagster.errors import CommitConflict
from longrun_dagster.storage import LocalStore, ObjectStore, S3Store


def store_spec(store: ObjectStore) -> dict[str, Any]:
    if isinstance(store, LocalStore):
        return {"kind": "local", "root": str(store.root)}
    assert isinstance(store, S3Store)
    return {"kind": "s3", "endpoint": store.client.meta.endpoint_url, "bucket": store.bucket,
            "prefix": store.prefix, "threshold": store.multipart_threshold,
            "part": store.part_size}


def open_spec(spec: dict[str, Any]) -> ObjectStore:
    if spec["kind"] == "local":
        return LocalStore(spec["root"])
    client = boto3.client("s3", endpoint_url=spec["endpoint"], region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    return S3Store(client, spec["bucket"], spec["prefix"],
                   multipart_threshold=spec["threshold"], part_size=spec["part"])


def payload(seed: int, size: int) -> bytes:
    """Deterministic bytes, different for every seed."""
    return seed.to_bytes(4, "little") * (size // 4)


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def announcing(store: ObjectStore, pause_before: str | None, release: str | None) -> None:
    real_put = store.put

    def put(key: str, data: bytes, **kw: Any) -> Any:
        kind = "manifest" if key.endswith(MANIFEST) else "data"
        if kind == pause_before:
            say("PAUSED")
            while release is None or not os.path.exists(release):
                time.sleep(0.01)
        say(f"BEGIN {kind}")
        result = real_put(key, data, **kw)
        say(f"END {kind}")
        return result

    store.put = put  # type: ignore[method-assign]


def main() -> int:
    spec = json.loads(sys.argv[1])
    store = open_spec(spec["store"])
    announcing(store, spec.get("pause_before"), spec.get("release"))
    partitions = PartitionStore(store)
    data = payload(spec["seed"], spec["size"])
    try:
        partitions.commit(spec["asset"], spec["partition"], {"data": (data, "bin")},
                          format="bytes", rows=None, run_id=f"writer-{spec['seed']}")
    except CommitConflict as exc:
        say(f"CONFLICT {exc}")
        return 3
    say("COMMITTED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
