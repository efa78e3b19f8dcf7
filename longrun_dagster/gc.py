"""Garbage collection in partition folders: objects no committed version names.

An object may go only once it has been unreferenced for the grace period. An object of a
replaced version is listed in the record as *retired* with the time of its replacement,
and goes ``grace`` seconds after that (a reader that looked the version up has that long
to read it). Any other unnamed object (a failed or superseded attempt's, or one a crash
left before its record was written) goes ``grace`` seconds after it was written, as do
leftovers of interrupted writes (temp files, unfinished multipart uploads). A folder
whose record is damaged or newer than this library is left alone for a human.
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
    for info in store.list(root):
        folder, _, _ = info.key.rpartition("/")
        if is_partition_folder(folder):  # checkpoints below it have owners of their own
            folders.setdefault(folder, []).append(info)
    cutoff = time.time() - grace
    removed = removed_bytes = 0
    for folder, entries in folders.items():
        record = _record(store, folder)
        if record is not None:
            n, size = _sweep(store, entries, record, cutoff)
            removed, removed_bytes = removed + n, removed_bytes + size
    incomplete = store.clean_incomplete(root, grace)
    return GcReport(len(folders), removed, removed_bytes, incomplete)


def collect_committed(store: ObjectStore, prefix: str, record: Record, grace: float
                      ) -> GcReport:
    """After a commit (``record`` is what it wrote): delete the partition's checkpoints
    (every attempt's: they are dead weight now, and their writers done or fenced out)
    and collect its folder; one listing."""
    cutoff = time.time() - grace
    entries, removed, removed_bytes = [], 0, 0
    for info in store.list(prefix):
        if info.key.startswith(prefix + CHECKPOINTS):
            store.delete(info.key)
        elif info.key.rpartition("/")[0] + "/" == prefix:
            entries.append(info)
    removed, removed_bytes = _sweep(store, entries, record, cutoff)
    incomplete = store.clean_incomplete(prefix, grace, at_once_under=prefix + CHECKPOINTS)
    return GcReport(1, removed, removed_bytes, incomplete)


def _sweep(store: ObjectStore, entries: list[ObjectInfo], record: Record, cutoff: float
           ) -> tuple[int, int]:
    named = {o.name for o in record.manifest.objects} if record.manifest else set()
    retired = {r.name: _epoch(r.since) for r in record.retired}
    removed = removed_bytes = 0
    for info in entries:
        name = info.key.rpartition("/")[2]
        if name.startswith(RESERVED_PREFIX) or name in named:
            continue
        unreferenced_since = retired.get(name, info.modified)
        if unreferenced_since > cutoff or info.modified > cutoff:
            continue
        store.delete(info.key)
        removed += 1
        removed_bytes += info.size
    return removed, removed_bytes


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
