"""Garbage collection in partition folders: objects no committed version names.

An object may go only once it has been unreferenced for the grace period: it was written
more than ``grace`` seconds ago, and the version that replaced it (the committed one, the
newest any reader can have looked up) landed more than ``grace`` seconds ago. So a reader
that looked up a version keeps ``grace`` seconds from its replacement to read it. Objects
of failed or superseded attempts and leftovers of interrupted writes (temp files,
unfinished multipart uploads) are orphans, collected by the same rule. A folder whose
record is damaged or newer than this library is left alone for a human to look at.
"""

import time
from dataclasses import dataclass
from datetime import datetime

from longrun_dagster import manifest
from longrun_dagster.errors import CorruptObject, NewerFormat, ObjectNotFound
from longrun_dagster.layout import MANIFEST, RESERVED_PREFIX, is_partition_folder
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
    folders: dict[str, list[tuple[str, ObjectInfo]]] = {}
    for info in store.list(root):
        folder, _, name = info.key.rpartition("/")
        if is_partition_folder(folder):  # checkpoints below it have owners of their own
            folders.setdefault(folder, []).append((name, info))
    cutoff = time.time() - grace
    removed = removed_bytes = 0
    for folder, entries in folders.items():
        kept = _referenced(store, folder, entries)
        if kept is None:
            continue
        names, replaced_at = kept
        if replaced_at > cutoff:
            continue  # readers of the version it replaced may still be reading
        for name, info in entries:
            if name.startswith(RESERVED_PREFIX) or name in names or info.modified > cutoff:
                continue
            store.delete(info.key)
            removed += 1
            removed_bytes += info.size
    incomplete = store.clean_incomplete(root, grace)
    return GcReport(len(folders), removed, removed_bytes, incomplete)


def _referenced(store: ObjectStore, folder: str, entries: list[tuple[str, ObjectInfo]]
                ) -> tuple[set[str], float] | None:
    """Names the committed version holds and when it landed; None: leave the folder."""
    record_info = next((info for name, info in entries if name == MANIFEST), None)
    if record_info is None:
        return set(), 0.0
    key = f"{folder}/{MANIFEST}"
    try:
        data, token = store.get(key)
        record = manifest.decode(data, token, store.uri_of(key))
    except ObjectNotFound:
        return set(), 0.0
    except (CorruptObject, NewerFormat):
        return None
    if record.manifest is None:
        return set(), 0.0
    landed = datetime.fromisoformat(record.manifest.created_at).timestamp()
    return {o.name for o in record.manifest.objects}, max(landed, record_info.modified)
