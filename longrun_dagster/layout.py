"""Where a partition's objects live: every name inside a partition folder, in one place.

    <asset path>/p=<partition>/          (or <asset path>/_unpartitioned/)
        _manifest.json                   the record: committed version + current claim
        data-<run>-<uuid>.parquet        objects of versions and attempts
        _checkpoints/<fp16>/a-<nonce>/   one folder per claiming attempt: cursors, shards

Names starting with ``_`` are reserved; ``storage.keys`` encodes asset paths and partition
keys so that no two (asset, partition) pairs share or nest folders.
"""

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from longrun_dagster.storage.keys import UNPARTITIONED, partition_prefix

MANIFEST = "_manifest.json"
CHECKPOINTS = "_checkpoints/"
RESERVED_PREFIX = "_"
ATTEMPT_PREFIX = "a-"


def describe(asset: Sequence[str], partition: str | None) -> str:
    name = "/".join(asset)
    return f"asset {name}" if partition is None else f"partition {partition!r} of asset {name}"


@dataclass(frozen=True)
class PartitionLayout:
    """The keys of one partition of one asset (the prefix is encoded once)."""

    asset: tuple[str, ...]
    partition: str | None
    prefix: str

    @classmethod
    def of(cls, asset: Sequence[str], partition: str | None) -> "PartitionLayout":
        return cls(tuple(asset), partition, partition_prefix(list(asset), partition))

    @property
    def manifest(self) -> str:
        return self.prefix + MANIFEST

    @property
    def checkpoints(self) -> str:
        return self.prefix + CHECKPOINTS

    def key(self, name: str) -> str:
        return self.prefix + name

    def checkpoint_root(self, fingerprint: str) -> str:
        """Checkpoints of one fingerprint (all attempts at it)."""
        return f"{self.checkpoints}{fingerprint[:16]}/"

    def describe(self) -> str:
        return describe(self.asset, self.partition)


def object_name(role: str, run_id: str, extension: str) -> str:
    """An attempt-unique name for a data object: never reused, never overwritten."""
    return f"{role}-{_safe(run_id)}-{uuid.uuid4().hex[:12]}.{extension}"


def attempt_folder(nonce: str) -> str:
    return f"{ATTEMPT_PREFIX}{nonce}"


def is_partition_folder(folder: str) -> bool:
    leaf = folder.rpartition("/")[2]
    return leaf.startswith("p=") or leaf == UNPARTITIONED


def _safe(run_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in run_id)[:40] or "run"
