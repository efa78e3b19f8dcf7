"""Manifests and claims: the typed, versioned records a partition folder and a checkpoint
cursor hold, and the one codec that writes and reads them.

A partition's ``_manifest.json`` is a *record*: the committed version (a ``Manifest``, or
none yet) and the claim of the attempt that currently owns the partition (or none). Both
live in one object so that one conditional write fences: claiming rewrites the record, so
every earlier attempt's token goes stale and its commit is refused by the store itself.

Format versions: 1 (a bare manifest, written up to 0.1) and 2 (0.2.0) are still read; 3 is
written: a committed version may name several ``data`` objects (a stage's checkpoint
shards, in batch order) and carries its content version over rows. A record from a newer
library raises ``NewerFormat`` ("upgrade"), never "damaged", so no writer overwrites what
it cannot read (an older library would read only the first of several data objects).
"""

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from longrun_dagster.errors import CorruptObject, NewerFormat

FORMAT_VERSION = 3
UNNAMED_ALGORITHM = "sha256"
"""The digest algorithm of an object whose record names none (written up to 0.1)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class StoredObject(_Frozen):
    """One object a manifest names: its role (``data``, ``quarantine``, ``shard:valid``...),
    its name inside the folder, its size, its digest and the algorithm that made it
    (``blake3`` since 0.2, ``sha256`` before: both verify)."""

    role: str
    name: str
    size: int
    digest: str
    algorithm: str = UNNAMED_ALGORITHM
    rows: int | None = None
    """Rows in it, where a writer counted them from the bytes it wrote (a stage's shards)."""

    @property
    def sha256(self) -> str:
        """The SHA-256 of the object, for an object recorded with one; compare ``digest``
        (with ``algorithm``) instead: objects written since 0.2 carry a BLAKE3 digest."""
        if self.algorithm != "sha256":
            raise ValueError(f"object {self.name} records a {self.algorithm} digest, not a "
                             "sha256 one; read StoredObject.digest and .algorithm")
        return self.digest


class Claim(_Frozen):
    """The attempt that owns a partition: a generation that only grows, its run, and a
    nonce that makes the claim (and so the record's token) unique."""

    generation: int
    run_id: str
    nonce: str
    claimed_at: str


class Retired(_Frozen):
    """An object of a replaced version, and when it was replaced: a reader that looked
    that version up may still read it, so GC keeps it for the grace period from ``since``."""

    name: str
    since: str


class Manifest(_Frozen):
    """A committed version of a partition (or a checkpoint cursor's contents)."""

    asset: list[str]
    partition: str | None
    format: str
    objects: list[StoredObject]
    rows: int | None
    fingerprint: str | None
    run_id: str
    created_at: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    generation: int | None = None
    content: str | None = None
    """The content version over the rows (a stage's ordered digest of its batches'
    digests), the same however the rows were split into objects; None: the objects'
    digests are the content version."""
    dtypes: dict[str, str] = Field(default_factory=dict)
    """Declared pandas dtypes of the columns of a multi-object frame (``parquet-batches``),
    given back on read."""
    token: str = Field(default="", exclude=True)
    """The store's version token of the record this was read from (not stored)."""

    def __eq__(self, other: object) -> bool:  # the token says where it was read, not what
        if not isinstance(other, Manifest):
            return NotImplemented
        return self.model_dump() == other.model_dump()

    def __hash__(self) -> int:
        return hash(self.data_version)

    def object(self, role: str = "data") -> StoredObject | None:
        """The first object of ``role`` (see ``objects_of`` for a multi-object one)."""
        return next((o for o in self.objects if o.role == role), None)

    def objects_of(self, role: str = "data") -> list[StoredObject]:
        """The objects of ``role``, in order (a stage's data: one per checkpoint shard)."""
        return [o for o in self.objects if o.role == role]

    @property
    def data_version(self) -> str:
        """A short, stable identity of the committed content (for downstream fingerprints
        and Dagster data versions): the content version over rows where one was recorded,
        else one over the objects' digests."""
        if self.content:
            return self.content
        joined = ",".join(f"{o.role}:{o.digest}" for o in self.objects)
        return hashlib.sha256(joined.encode()).hexdigest()[:24]

    @property
    def size(self) -> int:
        return sum(o.size for o in self.objects)

    def with_token(self, token: str) -> "Manifest":
        return self.model_copy(update={"token": token})


class Record(_Frozen):
    """What a partition's ``_manifest.json`` holds, and the token it was read with."""

    manifest: Manifest | None
    claim: Claim | None
    token: str
    retired: list[Retired] = Field(default_factory=list)

    @property
    def generation(self) -> int:
        """The newest generation this record knows of (0: never claimed)."""
        claimed = self.claim.generation if self.claim else 0
        committed = self.manifest.generation or 0 if self.manifest else 0
        return max(claimed, committed)


def encode(asset: list[str], partition: str | None, manifest: Manifest | None,
           claim: Claim | None, retired: Sequence[Retired] = ()) -> bytes:
    """The bytes of a record (format 2), checksummed."""
    body: dict[str, Any] = {
        "version": FORMAT_VERSION, "asset": list(asset), "partition": partition,
        "commit": manifest.model_dump() if manifest else None,
        "claim": claim.model_dump() if claim else None,
        "retired": [r.model_dump() for r in retired],
    }
    body["checksum"] = _checksum(body)
    return json.dumps(body, sort_keys=True, indent=1).encode()


def decode(data: bytes, token: str, uri: str) -> Record:
    """A record from its bytes: ``CorruptObject`` if damaged, ``NewerFormat`` if written by
    a newer library."""
    body = _verified_body(data, uri)
    version = body.get("version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise NewerFormat(
            f"{uri} was written by a newer longrun-dagster (format {version}; this one reads "
            f"up to {FORMAT_VERSION}); upgrade longrun-dagster on every host that runs this "
            "pipeline. Nothing was changed", uri=uri, version=version,
        )
    try:
        if version == 1:
            return _from_version_1(body, token)
        if version not in (2, FORMAT_VERSION):
            raise ValueError(f"unknown format version {version!r}")
        commit, claim = body["commit"], body["claim"]
        manifest = Manifest.model_validate({**commit, "token": token}) if commit else None
        retired = [Retired.model_validate(r) for r in body.get("retired", [])]
        return Record(manifest=manifest, claim=Claim.model_validate(claim) if claim else None,
                      token=token, retired=retired)
    except (ValueError, KeyError, TypeError, ValidationError) as exc:
        raise _unreadable(uri, exc) from exc


def _verified_body(data: bytes, uri: str) -> dict[str, Any]:
    try:
        body = json.loads(data)
        if not isinstance(body, dict):
            raise TypeError(f"a JSON {type(body).__name__}, not an object")
        expected = body.pop("checksum")
    except (ValueError, KeyError, TypeError) as exc:
        raise _unreadable(uri, exc) from exc
    actual = _checksum(body)
    if expected != actual:
        raise CorruptObject(
            f"manifest {uri} fails its own checksum (expected {expected}, got {actual}): it "
            "was modified after it was written", uri=uri, expected=str(expected), actual=actual,
        )
    return body


def _from_version_1(body: dict[str, Any], token: str) -> Record:
    body = dict(body)
    body.pop("version")
    body["objects"] = [{"role": o["role"], "name": o["name"], "size": o["size"],
                        "digest": o["sha256"], "algorithm": "sha256"}
                       for o in body["objects"]]
    return Record(manifest=Manifest.model_validate({**body, "token": token}), claim=None,
                  token=token)


def _unreadable(uri: str, exc: Exception) -> CorruptObject:
    return CorruptObject(f"manifest {uri} is unreadable ({exc}); it was damaged after it was "
                         "written", uri=uri, expected="valid manifest", actual=type(exc).__name__)


def _checksum(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()
