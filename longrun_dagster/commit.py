"""The partition commit protocol: attempt-unique data objects, a checksummed manifest last.

A partition is committed iff its ``_manifest.json`` exists, parses, matches its own checksum,
and every object it names has the size and SHA-256 it records. Nothing else counts.
"""

import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from longrun_dagster import formats
from longrun_dagster.errors import (
    CommitConflict,
    CorruptObject,
    LeaseLost,
    ObjectNotFound,
    PartitionNotCommitted,
)
from longrun_dagster.storage import ObjectStore
from longrun_dagster.storage.base import Sha256InBackground
from longrun_dagster.storage.keys import UNPARTITIONED, partition_prefix

MANIFEST = "_manifest.json"
LEASE = "_lease.json"
MANIFEST_VERSION = 1
RESERVED_PREFIX = "_"  # names under a partition folder that are not attempt objects

AssetPath = Sequence[str]


@dataclass(frozen=True)
class StoredObject:
    """One object a manifest names: role (``data``, ``quarantine``...), name, size, SHA-256."""

    role: str
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """The record that makes a partition committed."""

    asset: list[str]
    partition: str | None
    format: str
    objects: list[StoredObject]
    rows: int | None
    fingerprint: str | None
    run_id: str
    created_at: str
    metadata: dict[str, Any] = field(default_factory=dict)
    generation: int | None = None
    token: str = field(default="", compare=False)
    """The store's version token of this manifest (not stored; set when read)."""

    def object(self, role: str = "data") -> StoredObject | None:
        return next((o for o in self.objects if o.role == role), None)

    @property
    def data_version(self) -> str:
        """A short, stable identity of the committed bytes (for Dagster data versions)."""
        joined = ",".join(f"{o.role}:{o.sha256}" for o in self.objects)
        return hashlib.sha256(joined.encode()).hexdigest()[:24]

    @property
    def size(self) -> int:
        return sum(o.size for o in self.objects)

    def to_bytes(self) -> bytes:
        body = asdict(self)
        body.pop("token")
        body["version"] = MANIFEST_VERSION
        body["checksum"] = _checksum(body)
        return json.dumps(body, sort_keys=True, indent=1).encode()

    @classmethod
    def from_bytes(cls, data: bytes, token: str, uri: str) -> "Manifest":
        try:
            body = json.loads(data)
            expected = body.pop("checksum")
            actual = _checksum(body)
            if expected != actual:
                raise CorruptObject(
                    f"manifest {uri} fails its own checksum (expected {expected}, got "
                    f"{actual}): it was modified after commit; re-materialize the partition",
                    uri=uri, expected=expected, actual=actual,
                )
            body.pop("version")
            body["objects"] = [StoredObject(**o) for o in body["objects"]]
            return cls(**body, token=token)
        except CorruptObject:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptObject(
                f"manifest {uri} is unreadable ({exc}); it was damaged after commit; "
                "re-materialize the partition",
                uri=uri, expected="valid manifest", actual=type(exc).__name__,
            ) from exc


def _checksum(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()


@dataclass(frozen=True)
class Current:
    """A partition as a writer finds it (see ``PartitionStore.current``)."""

    manifest: Manifest | None
    token: str | None
    damage: CorruptObject | None


class _Unset:
    pass


UNSET: Any = _Unset()


@dataclass(frozen=True)
class GcReport:
    """What ``PartitionStore.collect_garbage`` removed."""

    partitions_scanned: int
    objects_removed: int
    bytes_removed: int
    incomplete_removed: int


def describe(asset: AssetPath, partition: str | None) -> str:
    name = "/".join(asset)
    return f"asset {name}" if partition is None else f"partition {partition!r} of asset {name}"


def read_verified(store: ObjectStore, key: str, stored: StoredObject, *, owner: str,
                  fix: str, decode: Callable[[bytes], Any] | None = None) -> Any:
    """The object's bytes (or ``decode(bytes)``) if they have the size and SHA-256 that
    ``stored`` records, else ``CorruptObject`` naming its URI, ``owner`` (what names it)
    and ``fix``. With ``decode``, hashing runs beside decoding (both release the GIL) and
    the decoded value is returned only after the digest matched."""
    uri = store.uri_of(key)
    try:
        data, _ = store.get(key)
    except ObjectNotFound as exc:
        raise CorruptObject(f"object {uri} named by {owner} is missing; {fix}",
                            uri=uri, expected=stored.size, actual="missing") from exc
    if len(data) != stored.size:
        raise CorruptObject(
            f"object {uri} has {len(data)} bytes, {owner} says {stored.size}; {fix}",
            uri=uri, expected=stored.size, actual=len(data),
        )
    digest = Sha256InBackground(data)
    value: Any = data
    decode_error: Exception | None = None
    if decode is not None:
        try:
            value = decode(data)
        except Exception as exc:  # noqa: BLE001 - damaged bytes: the digest says so below
            decode_error = exc
    actual = digest.hexdigest()
    if actual != stored.sha256:
        raise CorruptObject(
            f"object {uri} fails its SHA-256 check (expected {stored.sha256[:16]}..., "
            f"got {actual[:16]}...); {fix}", uri=uri, expected=stored.sha256, actual=actual,
        )
    if decode_error is not None:
        raise decode_error
    return value


class PartitionStore:
    """Commits and reads whole partitions of assets on an ``ObjectStore``."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    def prefix(self, asset: AssetPath, partition: str | None) -> str:
        return partition_prefix(list(asset), partition)

    def uri(self, asset: AssetPath, partition: str | None) -> str:
        return self.store.uri_of(self.prefix(asset, partition) + MANIFEST).rsplit("/", 1)[0]

    def lookup(self, asset: AssetPath, partition: str | None) -> Manifest | None:
        """The committed manifest of a partition, or None; one manifest read."""
        key = self.prefix(asset, partition) + MANIFEST
        try:
            data, token = self.store.get(key)
        except ObjectNotFound:
            return None
        manifest = Manifest.from_bytes(data, token, self.store.uri_of(key))
        if manifest.partition != partition or list(manifest.asset) != list(asset):
            raise CorruptObject(
                f"manifest {self.store.uri_of(key)} belongs to "
                f"{describe(manifest.asset, manifest.partition)}, not "
                f"{describe(asset, partition)}; the bucket was edited by hand; delete it",
                uri=self.store.uri_of(key), expected=str(partition),
                actual=str(manifest.partition),
            )
        return manifest

    def current(self, asset: AssetPath, partition: str | None) -> "Current":
        """What a new commit of the partition replaces: its committed manifest, or None if
        there is none or it is damaged (then ``damage`` says why), and the token to write
        against. A damaged manifest does not make a partition committed, so re-materializing
        the partition replaces it; ``lookup`` keeps reporting it until then."""
        try:
            manifest = self.lookup(asset, partition)
        except CorruptObject as exc:
            try:
                token: str | None = self.store.stat(self.prefix(asset, partition) + MANIFEST).token
            except ObjectNotFound:
                token = None
            return Current(None, token, exc)
        return Current(manifest, manifest.token if manifest else None, None)

    def take_lease(self, asset: AssetPath, partition: str | None, run_id: str) -> int:
        """Fence out earlier attempts: bump the partition's lease generation (conditional
        write) and return it. A commit carrying an older generation raises ``LeaseLost``."""
        key = self.prefix(asset, partition) + LEASE
        while True:
            current, token = self._lease(key)
            generation = current + 1
            body = json.dumps({"generation": generation, "run_id": run_id}).encode()
            try:
                self.store.put(key, body, if_absent=token is None, if_match=token)
                return generation
            except CommitConflict:
                continue  # another attempt took it at the same moment: take the next one

    def check_lease(self, asset: AssetPath, partition: str | None, generation: int) -> None:
        """Raise ``LeaseLost`` if a newer attempt took the partition's lease."""
        key = self.prefix(asset, partition) + LEASE
        current, _ = self._lease(key)
        if current != generation:
            holder = json.loads(self.store.get(key)[0]).get("run_id", "?")
            raise LeaseLost(
                f"{describe(asset, partition)}: this attempt holds lease generation "
                f"{generation}, but run {holder} took generation {current} since; a newer "
                "attempt owns the partition, so this one must not commit (nothing to do: "
                "the newer attempt commits it)", uri=self.store.uri_of(key),
            )

    def _lease(self, key: str) -> tuple[int, str | None]:
        try:
            data, token = self.store.get(key)
        except ObjectNotFound:
            return 0, None
        try:
            return int(json.loads(data)["generation"]), token
        except (ValueError, KeyError, TypeError) as exc:
            uri = self.store.uri_of(key)
            raise CorruptObject(
                f"lease {uri} is unreadable ({exc}); it was damaged. Once no attempt of this "
                "partition is running, delete it and re-materialize the partition",
                uri=uri, expected="valid lease", actual=type(exc).__name__,
            ) from exc

    def committed_with(
        self, asset: AssetPath, partition: str | None, fingerprint: str
    ) -> Manifest | None:
        """The manifest if the partition is committed with ``fingerprint``; one read."""
        manifest = self.lookup(asset, partition)
        return manifest if manifest and manifest.fingerprint == fingerprint else None

    def commit(
        self,
        asset: AssetPath,
        partition: str | None,
        objects: Mapping[str, tuple[bytes | memoryview, str]],
        *,
        format: str,
        rows: int | None,
        run_id: str,
        fingerprint: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        generation: int | None = None,
        expect: str | None = UNSET,
    ) -> Manifest:
        """Write ``objects`` (role -> (bytes, extension)) and then the manifest.

        ``expect`` is the manifest token the caller saw when it started (None: no manifest):
        if another writer committed since, ``CommitConflict`` is raised and nothing this
        call wrote is ever read. Without ``expect``, the token is read now.
        """
        prefix = self.prefix(asset, partition)
        if expect is UNSET:
            expect = self.current(asset, partition).token
        attempt = f"{_safe(run_id)}-{uuid.uuid4().hex[:12]}"
        stored = []
        for role, (data, extension) in objects.items():
            put = self.store.put(f"{prefix}{role}-{attempt}.{extension}", data)
            stored.append(StoredObject(role, put.key.rsplit("/", 1)[1], put.size, put.sha256))
        if generation is not None:
            self.check_lease(asset, partition, generation)
        manifest = Manifest(
            asset=list(asset), partition=partition, format=format, objects=stored, rows=rows,
            fingerprint=fingerprint, run_id=run_id,
            created_at=datetime.now(UTC).isoformat(timespec="milliseconds"),
            metadata=dict(metadata or {}), generation=generation,
        )
        try:
            put = self.store.put(
                prefix + MANIFEST, manifest.to_bytes(),
                if_absent=expect is None, if_match=expect,
            )
        except CommitConflict as exc:
            winner = self.lookup(asset, partition)
            if winner is not None and winner.objects == stored:
                # Our own manifest: the PUT landed but its answer was lost, and the
                # client's retry of the conditional write was refused by it.
                return winner
            by = f" by run {winner.run_id}" if winner else ""
            raise CommitConflict(
                f"{describe(asset, partition)} was committed{by} while run {run_id} was "
                "writing it; this attempt's objects were not committed and will be "
                "garbage-collected. Re-run the partition if the committed version is not "
                "the one you want", uri=exc.uri,
            ) from exc
        return replace(manifest, token=put.token)

    def read(
        self, asset: AssetPath, partition: str | None, role: str = "data"
    ) -> tuple[Manifest, bytes]:
        """The verified bytes of a committed partition's ``role`` object."""
        manifest = self.lookup(asset, partition)
        if manifest is None:
            where = self.uri(asset, partition)
            raise PartitionNotCommitted(
                f"{describe(asset, partition)} is not committed (no manifest at {where}); "
                "materialize it first",
                uri=where, asset="/".join(asset), partition=partition,
            )
        stored = manifest.object(role)
        if stored is None:
            return manifest, b""
        return manifest, self.read_object(asset, partition, stored)

    def load(self, asset: AssetPath, partition: str | None, role: str = "data"
             ) -> tuple[Manifest, Any]:
        """A committed partition's ``role`` object, verified and decoded (DataFrame,
        tensors or JSON); hashing and decoding overlap."""
        manifest = self.lookup(asset, partition)
        if manifest is None:
            self.read(asset, partition, role)  # raises PartitionNotCommitted
        assert manifest is not None
        stored = manifest.object(role)
        if stored is None:
            return manifest, formats.decode(manifest.format, b"")
        fmt = manifest.format if role == "data" else formats.format_of(stored.name)
        return manifest, self.read_object(asset, partition, stored,
                                          decode=lambda data: formats.decode(fmt, data))

    def read_object(self, asset: AssetPath, partition: str | None, stored: StoredObject,
                    decode: Callable[[bytes], Any] | None = None) -> Any:
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
        problems = []
        for stored in manifest.objects:
            key = self.prefix(manifest.asset, manifest.partition) + stored.name
            try:
                size = self.store.stat(key).size
            except ObjectNotFound:
                problems.append(f"{self.store.uri_of(key)} is missing")
                continue
            if size != stored.size:
                problems.append(f"{self.store.uri_of(key)} has {size} bytes, its manifest "
                                f"says {stored.size}")
        return problems

    def verify(self, manifest: Manifest) -> None:
        """Check every object the manifest names by reading it (``CorruptObject``)."""
        for stored in manifest.objects:
            self.read_object(manifest.asset, manifest.partition, stored)

    def collect_garbage(
        self, asset: AssetPath | None = None, *, older_than_s: float = 3600.0
    ) -> GcReport:
        """Delete objects no manifest names (failed or superseded attempts) and leftovers of
        interrupted writes, older than ``older_than_s`` (a reader of the previous version
        may still be reading them). Never touches committed data."""
        root = "/".join(partition_prefix(list(asset), None).split("/")[:-2]) + "/" if asset \
            else ""
        return self._collect(root, older_than_s)

    def collect_garbage_partition(
        self, asset: AssetPath, partition: str | None, *, older_than_s: float = 3600.0
    ) -> GcReport:
        """``collect_garbage`` for one partition's folder (run after each commit)."""
        return self._collect(self.prefix(asset, partition), older_than_s)

    def _collect(self, root: str, older_than_s: float) -> GcReport:
        folders: dict[str, list[Any]] = {}
        for info in self.store.list(root):
            folder, _, name = info.key.rpartition("/")
            if _is_partition_folder(folder):  # checkpoints etc. below it have owners of their own
                folders.setdefault(folder, []).append((name, info))
        cutoff = time.time() - older_than_s
        removed = removed_bytes = 0
        for folder, entries in folders.items():
            keep = self._referenced(folder, entries)
            if keep is None:
                continue  # a damaged manifest: leave the folder for a human to look at
            for name, info in entries:
                if name.startswith(RESERVED_PREFIX) or name in keep or info.modified > cutoff:
                    continue
                self.store.delete(info.key)
                removed += 1
                removed_bytes += info.size
        incomplete = self.store.clean_incomplete(root, older_than_s)
        return GcReport(len(folders), removed, removed_bytes, incomplete)

    def _referenced(self, folder: str, entries: Iterable[tuple[str, Any]]) -> set[str] | None:
        if not any(name == MANIFEST for name, _ in entries):
            return set()
        key = f"{folder}/{MANIFEST}"
        try:
            data, token = self.store.get(key)
            manifest = Manifest.from_bytes(data, token, self.store.uri_of(key))
        except (CorruptObject, ObjectNotFound):
            return None
        return {o.name for o in manifest.objects}


def _is_partition_folder(folder: str) -> bool:
    leaf = folder.rpartition("/")[2]
    return leaf.startswith("p=") or leaf == UNPARTITIONED


def _safe(run_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in run_id)[:40] or "run"
