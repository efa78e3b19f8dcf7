"""Garbage collection in partition folders: objects no committed version names.

An object may go only once it has been unreferenced for the grace period. An object of a
replaced version is listed in the record as *retired* with the time of its replacement,
and goes ``grace`` seconds after that (a reader that looked the version up has that long
to read it). Any other unnamed object (a failed or superseded attempt's, or one a crash
left before its record was written) goes ``grace`` seconds after it was written, as do
leftovers of interrupted writes (temp files, unfinished multipart uploads). A folder
whose record is damaged or newer than this library is left alone for a human.

A stage's committed data objects are its checkpoint shards, under ``_checkpoints/``
(promoted, not copied): named by a version, they are live like any object of it; retired
with it, they go after the grace like any. Everything else under ``_checkpoints/``
belongs to attempts (a resumable partition's progress) and goes when the partition
commits.
"""

import time
from dataclasses import dataclass
from datetime import datetime

from longrun_dagster import manifest
from longrun_dagster.errors import CorruptObject, NewerFormat, ObjectNotFound
from longrun_dagster.layout import CHECKPOINTS, MANIFEST, RESERVED_PREFIX, is_partition_folder
from longrun_dagster.manifest import Record
from longrun_dagster.storage import ObjectInfo, ObjectStore


@dataclass(frozen=True)
class GcReport:
    """What a garbage collection removed."""

    partitions_scanned: int
    objects_removed: int
    bytes_removed: int
    incomplete_removed: int


def collect(store: ObjectStore, root: str, grace: float) -> GcReport:
    """Collect every partition folder under ``root`` (a key prefix, ``""`` for all)."""
    folders: dict[str, list[ObjectInfo]] = {}
    promoted: dict[str, list[ObjectInfo]] = {}
    for info in store.list(root):
        folder, _, _ = info.key.rpartition("/")
        if is_partition_folder(folder):
            folders.setdefault(folder, []).append(info)
        elif f"/{CHECKPOINTS}" in info.key:  # a shard a committed version may name
            owner = info.key.split(f"/{CHECKPOINTS}", 1)[0]
            if is_partition_folder(owner):
                promoted.setdefault(owner, []).append(info)
    cutoff = time.time() - grace
    removed = removed_bytes = 0
    for folder in folders.keys() | promoted.keys():
        record = _record(store, folder)
        if record is None:
            continue
        n, size = _sweep(store, folder + "/", folders.get(folder, []), record, cutoff)
        # below _checkpoints/ only what a replaced version named: the rest belongs to
        # attempts (resumable checkpoints), and a commit clears it
        retired = {r.name for r in record.retired}
        m, more = _sweep(store, folder + "/", [i for i in promoted.get(folder, [])
                                               if _relative(folder + "/", i) in retired],
                         record, cutoff)
        removed, removed_bytes = removed + n + m, removed_bytes + size + more
    incomplete = store.clean_incomplete(root, grace)
    return GcReport(len(folders), removed, removed_bytes, incomplete)


def collect_committed(store: ObjectStore, prefix: str, record: Record, grace: float
                      ) -> GcReport:
    """After a commit (``record`` is what it wrote): delete the partition's checkpoints
    (every attempt's: they are dead weight now, and their writers done or fenced out)
    except the shards a version names (this one's, or a replaced one's within the grace),
    and collect its folder; one listing."""
    cutoff = time.time() - grace
    live = _named(record) | {r.name for r in record.retired
                             if _epoch(r.since) > cutoff}
    entries, removed, removed_bytes = [], 0, 0
    for info in store.list(prefix):
        if info.key.startswith(prefix + CHECKPOINTS):
            if _relative(prefix, info) not in live:
                store.delete(info.key)
        elif info.key.rpartition("/")[0] + "/" == prefix:
            entries.append(info)
    removed, removed_bytes = _sweep(store, prefix, entries, record, cutoff)
    incomplete = store.clean_incomplete(prefix, grace, at_once_under=prefix + CHECKPOINTS)
    return GcReport(1, removed, removed_bytes, incomplete)


def _sweep(store: ObjectStore, prefix: str, entries: list[ObjectInfo], record: Record,
           cutoff: float) -> tuple[int, int]:
    named = _named(record)
    retired = {r.name: _epoch(r.since) for r in record.retired}
    removed = removed_bytes = 0
    for info in entries:
        name = _relative(prefix, info)
        if (name.startswith(RESERVED_PREFIX) and name not in retired) or name in named:
            continue
        unreferenced_since = retired.get(name, info.modified)
        if unreferenced_since > cutoff or info.modified > cutoff:
            continue
        store.delete(info.key)
        removed += 1
        removed_bytes += info.size
    return removed, removed_bytes


def _named(record: Record) -> set[str]:
    """Names (relative to the partition folder) of the committed version's objects."""
    return {o.name for o in record.manifest.objects} if record.manifest else set()


def _relative(prefix: str, info: ObjectInfo) -> str:
    return info.key[len(prefix):]


def _record(store: ObjectStore, folder: str) -> Record | None:
    """The folder's record (an empty one if none); None: leave the folder alone."""
    key = f"{folder}/{MANIFEST}"
    try:
        data, token = store.get(key)
        return manifest.decode(data, token, store.uri_of(key))
    except ObjectNotFound:
        return Record(manifest=None, claim=None, token="")
    except (CorruptObject, NewerFormat):
        return None


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()
