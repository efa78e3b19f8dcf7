"""Committed partitions on an ``ObjectStore``: start attempts, read verified versions, GC.

A partition is committed iff its ``_manifest.json`` record holds a committed version that
passes its own checksum, and every object it names has the size and digest it records.
Nothing else counts. Writing is ``PartitionAttempt``'s (``begin``); this is the reader's
side and the whole-store chores.
"""

import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from longrun_dagster import formats, gc
from longrun_dagster.attempt import (
    Committed,
    PartitionAttempt,
    Reused,
    check_sizes,
    damaged_record_fix,
    read_record,
)
from longrun_dagster.errors import ConfigError, CorruptObject, PartitionNotCommitted
from longrun_dagster.formats import parquet
from longrun_dagster.gc import GcReport as GcReport
from longrun_dagster.layout import MANIFEST as MANIFEST
from longrun_dagster.layout import PartitionLayout
from longrun_dagster.layout import describe as describe
from longrun_dagster.manifest import Manifest as Manifest
from longrun_dagster.manifest import StoredObject as StoredObject
from longrun_dagster.storage import ObjectStore
from longrun_dagster.storage.keys import partition_prefix
from longrun_dagster.verify import read_verified

AssetPath = Sequence[str]
_READERS = 8


class PartitionStore:
    """Commits and reads whole partitions of assets on an ``ObjectStore``."""

    def __init__(self, store: ObjectStore, *, gc_grace_seconds: float = 3600.0) -> None:
        self.store = store
        self.gc_grace_seconds = gc_grace_seconds

    def begin(self, asset: AssetPath, partition: str | None, *, run_id: str,
              fingerprint: str | None = None,
              log: logging.Logger | logging.LoggerAdapter[Any] | None = None
              ) -> PartitionAttempt:
        """An attempt at one partition (see ``PartitionAttempt``); one record read."""
        return PartitionAttempt.begin(self.store, asset, partition, run_id=run_id,
                                      fingerprint=fingerprint, log=log,
                                      gc_grace_seconds=self.gc_grace_seconds)

    def prefix(self, asset: AssetPath, partition: str | None) -> str:
        return partition_prefix(list(asset), partition)

    def uri(self, asset: AssetPath, partition: str | None) -> str:
        return self.store.uri_of(self.prefix(asset, partition).rstrip("/"))

    def lookup(self, asset: AssetPath, partition: str | None) -> Manifest | None:
        """The committed version of a partition, or None; one read. A damaged record
        raises ``CorruptObject``, a newer one ``NewerFormat``."""
        layout = PartitionLayout.of(asset, partition)
        record, damage = read_record(self.store, layout)
        if damage is not None:
            raise CorruptObject(f"{damage}. {damaged_record_fix(damage.uri or '')}",
                                uri=damage.uri or "", expected=damage.expected,
                                actual=damage.actual)
        return record.manifest if record else None

    def committed_with(self, asset: AssetPath, partition: str | None, fingerprint: str
                       ) -> Manifest | None:
        """The manifest if the partition is committed with ``fingerprint``; one read."""
        manifest = self.lookup(asset, partition)
        return manifest if manifest and manifest.fingerprint == fingerprint else None

    def commit(self, asset: AssetPath, partition: str | None,
               objects: Mapping[str, tuple[bytes | memoryview, str]], *, format: str,
               rows: int | None, run_id: str, fingerprint: str | None = None,
               metadata: Mapping[str, Any] | None = None) -> Manifest:
        """Write ``objects`` (role -> (bytes, extension)) and then the record, as one
        unclaimed attempt (a conflict with a concurrent commit raises ``CommitConflict``)."""
        attempt = self.begin(asset, partition, run_id=run_id, fingerprint=fingerprint)
        result = attempt.commit_objects(objects, format=format, rows=rows, metadata=metadata)
        assert isinstance(result, Committed | Reused)
        return result.manifest

    def read(self, asset: AssetPath, partition: str | None, role: str = "data"
             ) -> tuple[Manifest, bytes]:
        """The verified bytes of a committed partition's ``role`` object (a partition
        stored as several objects: ``load`` it, or ``read_object`` each)."""
        manifest = self.committed(asset, partition)
        stored = manifest.objects_of(role)
        if not stored:
            return manifest, b""
        if len(stored) > 1:
            raise ConfigError(
                f"{describe(asset, partition)} is stored as {len(stored)} {role} objects; "
                "read() returns one object's bytes: use load() for the whole frame, or "
                "read_object() for each of manifest.objects_of(role)")
        return manifest, self.read_object(asset, partition, stored[0])

    def load(self, asset: AssetPath, partition: str | None, role: str = "data"
             ) -> tuple[Manifest, Any]:
        """A committed partition's ``role`` objects, verified, then decoded (DataFrame,
        tensors or JSON); a frame stored as several objects is read in parallel and
        returned as one."""
        manifest = self.committed(asset, partition)
        return manifest, self.load_version(manifest, role)

    def load_version(self, manifest: Manifest, role: str = "data") -> Any:
        """``load`` of the committed version ``manifest`` (already looked up)."""
        asset, partition = manifest.asset, manifest.partition
        stored = manifest.objects_of(role)
        if role == "data" and manifest.format == formats.BATCHES_FORMAT:
            return formats.decode_batches(self._read_tables(asset, partition, stored),
                                          manifest.dtypes)
        if not stored:  # no object of the role: none (a clean stage has no quarantine)
            return formats.decode(manifest.format, b"") if role == "data" else None
        fmt = manifest.format if role == "data" else formats.format_of(stored[0].name)
        return self.read_object(asset, partition, stored[0],
                                decode=lambda data: formats.decode(fmt, data))

    def _read_tables(self, asset: AssetPath, partition: str | None,
                     stored: Sequence[StoredObject]) -> list[Any]:
        """Each object read, verified and decoded as an Arrow table, in order; several at
        once (object stores serve parallel reads; Parquet decoding releases the GIL)."""
        def one(obj: StoredObject) -> Any:
            return self.read_object(asset, partition, obj, decode=parquet.loads_table)

        if len(stored) <= 1:
            return [one(o) for o in stored]
        with ThreadPoolExecutor(min(_READERS, len(stored)), "longrun-read") as pool:
            return list(pool.map(one, stored))

    def committed(self, asset: AssetPath, partition: str | None) -> Manifest:
        """The committed version of a partition; ``PartitionNotCommitted`` if none."""
        manifest = self.lookup(asset, partition)
        if manifest is None:
            where = self.uri(asset, partition)
            raise PartitionNotCommitted(
                f"{describe(asset, partition)} is not committed (no manifest at {where}); "
                "materialize it first",
                uri=where, asset="/".join(asset), partition=partition,
            )
        return manifest

    def read_object(self, asset: AssetPath, partition: str | None, stored: StoredObject,
                    decode: Any = None) -> Any:
        """The verified bytes of one object of a partition, or ``decode`` of them."""
        manifest_uri = self.store.uri_of(self.prefix(asset, partition) + MANIFEST)
        fix = (f"it changed after commit; re-materialize {describe(asset, partition)} "
               "to recompute it, or restore the object from a backup (a model stage reuses "
               "a partition whose objects have their recorded sizes without reading them: "
               f"if this one's size is unchanged, delete the manifest {manifest_uri} first)")
        return read_verified(self.store, self.prefix(asset, partition) + stored.name, stored,
                             owner=f"the manifest of {describe(asset, partition)}", fix=fix,
                             decode=decode)

    def check_sizes(self, manifest: Manifest) -> list[str]:
        """What is wrong with the objects a manifest names that one stat each can see
        (missing, or not the recorded size), without reading them; empty if nothing."""
        return check_sizes(self.store, PartitionLayout.of(manifest.asset, manifest.partition),
                           manifest)

    def verify(self, manifest: Manifest) -> None:
        """Check every object the manifest names by reading it (``CorruptObject``)."""
        for stored in manifest.objects:
            self.read_object(manifest.asset, manifest.partition, stored)

    def collect_garbage(self, asset: AssetPath | None = None, *,
                        older_than_s: float | None = None) -> GcReport:
        """Delete what no committed version names, once unreferenced for ``older_than_s``
        (default: ``gc_grace_seconds``); see ``longrun_dagster.gc``. Never touches
        committed data."""
        root = partition_prefix(list(asset), None).rsplit("/", 2)[0] + "/" if asset else ""
        grace = self.gc_grace_seconds if older_than_s is None else older_than_s
        return gc.collect(self.store, root, grace)

    def collect_garbage_partition(self, asset: AssetPath, partition: str | None, *,
                                  older_than_s: float | None = None) -> GcReport:
        """``collect_garbage`` for one partition's folder."""
        grace = self.gc_grace_seconds if older_than_s is None else older_than_s
        return gc.collect(self.store, self.prefix(asset, partition), grace)
