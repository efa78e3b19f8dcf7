"""One attempt at one partition of one asset: the commit protocol, with one owner.

    attempt = PartitionAttempt.begin(store, asset, partition, run_id=r, fingerprint=f)
    attempt.reusable()             # committed with this fingerprint, objects whole? (reads)
    attempt.claim()                # fence out every older attempt (one conditional write)
    attempt.checkpointer()         # this attempt's own checkpoint folder
    attempt.commit(frame, extra={"quarantine": q}, metadata={...})

Fencing has no window: claiming rewrites the partition's record (its committed version
unchanged, plus a claim with a fresh nonce) conditionally on the token seen, and the
commit is a conditional write on the token of this attempt's own claim. Any later claim
changes that token, so the store itself (S3 ``If-Match``; a locked compare-and-rename
locally) refuses a superseded attempt's commit. A missing or damaged record is never
overwritten by a claim, so a claim's generation never goes back.
"""

import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import pyarrow as pa

from longrun_dagster import formats, gc, manifest
from longrun_dagster.checkpoint import Checkpointer
from longrun_dagster.errors import (
    CommitConflict,
    ConfigError,
    CorruptObject,
    IncompleteCommit,
    LeaseLost,
    ObjectNotFound,
    StorageError,
)
from longrun_dagster.formats import parquet, tables
from longrun_dagster.layout import PartitionLayout, attempt_folder, object_name
from longrun_dagster.ledger import Ledger
from longrun_dagster.manifest import Claim, Manifest, Record, Retired, StoredObject
from longrun_dagster.storage import ObjectStore

_log = logging.getLogger("longrun_dagster.attempt")
_CLAIM_TRIES = 50
_STATS_BEFORE_LISTING = 2
"""A reuse check stats up to this many objects, and lists the partition for more."""
Log = logging.Logger | logging.LoggerAdapter[Any]


@dataclass(frozen=True)
class Claimed:
    """This attempt owns the partition now; every older attempt is fenced out."""

    claim: Claim


@dataclass(frozen=True)
class Reused:
    """The partition is committed with this attempt's fingerprint: nothing to compute."""

    manifest: Manifest


@dataclass(frozen=True)
class Committed:
    """This attempt committed the partition."""

    manifest: Manifest


def read_record(store: ObjectStore, layout: PartitionLayout
                ) -> tuple[Record | None, CorruptObject | None]:
    """A partition's record (None: never written), or the damage that makes it unreadable.
    ``NewerFormat`` propagates: nobody may act on a record they cannot read."""
    try:
        data, token = store.get(layout.manifest)
    except ObjectNotFound:
        return None, None
    uri = store.uri_of(layout.manifest)
    try:
        record = manifest.decode(data, token, uri)
    except CorruptObject as exc:
        return None, exc
    committed = record.manifest
    if committed is not None and (committed.partition != layout.partition
                                  or tuple(committed.asset) != layout.asset):
        return None, CorruptObject(
            f"manifest {uri} belongs to partition {committed.partition!r} of asset "
            f"{'/'.join(committed.asset)}, not {layout.describe()}; it was copied or edited "
            "by hand", uri=uri, expected=str(layout.partition), actual=str(committed.partition),
        )
    return record, None


def check_sizes(store: ObjectStore, layout: PartitionLayout, committed: Manifest) -> list[str]:
    """What is wrong with the objects a manifest names that a stat can see (missing, or
    not the recorded size), without reading them; empty if nothing. One stat each, or
    one listing of the partition for a stage's many shards."""
    if len(committed.objects) > _STATS_BEFORE_LISTING:
        listed = {info.key: info.size for info in store.list(layout.prefix)}
        sizes = {o.name: listed.get(layout.key(o.name)) for o in committed.objects}
    else:
        sizes = {o.name: _size(store, layout.key(o.name)) for o in committed.objects}
    problems = []
    for stored in committed.objects:
        key, size = layout.key(stored.name), sizes[stored.name]
        if size is None:
            problems.append(f"{store.uri_of(key)} is missing")
        elif size != stored.size:
            problems.append(f"{store.uri_of(key)} has {size} bytes, its manifest says "
                            f"{stored.size}")
    return problems


def _size(store: ObjectStore, key: str) -> int | None:
    try:
        return store.stat(key).size
    except ObjectNotFound:
        return None


def damaged_record_fix(uri: str) -> str:
    return (f"Nothing was overwritten. Once no run of this partition is running, delete it "
            f"({uri}; its committed version, if any, is then recomputed) and re-materialize "
            "the partition")


class PartitionAttempt:
    """An attempt at one partition: what it saw at ``begin``, its claim, its commit."""

    def __init__(self, store: ObjectStore, layout: PartitionLayout, *, run_id: str,
                 fingerprint: str | None, seen: Record | None, damage: CorruptObject | None,
                 gc_grace_seconds: float, log: Log) -> None:
        self.store, self.layout, self.run_id = store, layout, run_id
        self.fingerprint, self.gc_grace_seconds, self.log = fingerprint, gc_grace_seconds, log
        self._seen, self.damage = seen, damage
        self._claim: Claim | None = None
        self._claim_token: str | None = None
        self.problems: list[str] = []
        """Why a committed version with this fingerprint is not reusable (after
        ``reusable()``)."""

    @classmethod
    def begin(cls, store: ObjectStore, asset: Sequence[str],
              partition: str | None, *, run_id: str, fingerprint: str | None = None,
              gc_grace_seconds: float = 3600.0, log: Log | None = None) -> "PartitionAttempt":
        """Start an attempt: one read of the partition's record."""
        layout = PartitionLayout.of(asset, partition)
        seen, damage = read_record(store, layout)
        return cls(store, layout, run_id=run_id, fingerprint=fingerprint, seen=seen,
                   damage=damage, gc_grace_seconds=gc_grace_seconds, log=log or _log)

    # -- what it found --------------------------------------------------------------------

    @property
    def committed(self) -> Manifest | None:
        """The committed version seen (None: none, or the record is damaged)."""
        return self._seen.manifest if self._seen else None

    @property
    def uri(self) -> str:
        return self.store.uri_of(self.layout.prefix.rstrip("/"))

    def describe(self) -> str:
        return self.layout.describe()

    def reusable(self) -> Manifest | None:
        """The committed version if it has this attempt's fingerprint and every object it
        names has its recorded size (one stat each; ``problems`` says what is not)."""
        committed = self.committed
        self.problems = []
        if committed is None or self.fingerprint is None or \
                committed.fingerprint != self.fingerprint:
            return None
        self.problems = check_sizes(self.store, self.layout, committed)
        return None if self.problems else committed

    # -- claim ----------------------------------------------------------------------------

    def claim(self) -> Claimed | Reused:
        """Own the partition: every older attempt's commit is refused from now on. If
        another attempt committed this fingerprint meanwhile, say so instead."""
        for _ in range(_CLAIM_TRIES):
            if self.damage is not None:
                raise self._damaged()
            seen = self._seen
            claim = Claim(generation=(seen.generation if seen else 0) + 1, run_id=self.run_id,
                          nonce=uuid.uuid4().hex, claimed_at=_now())
            body = manifest.encode(list(self.layout.asset), self.layout.partition,
                                   seen.manifest if seen else None, claim,
                                   seen.retired if seen else ())
            try:
                put = self.store.put(self.layout.manifest, body, if_absent=seen is None,
                                     if_match=seen.token if seen else None)
            except CommitConflict:
                self._seen, self.damage = read_record(self.store, self.layout)
                if self._seen and self._seen.claim == claim:
                    put_token = self._seen.token  # ours landed; its answer was lost
                    return self._claimed(claim, put_token)
                reused = self.reusable()
                if reused is not None:
                    return Reused(reused)
                continue  # another attempt claimed at the same moment: claim after it
            return self._claimed(claim, put.token)
        raise CommitConflict(f"{self.describe()}: could not claim the partition in "
                             f"{_CLAIM_TRIES} tries; other attempts keep claiming it",
                             uri=self.store.uri_of(self.layout.manifest))

    def _claimed(self, claim: Claim, token: str) -> Claimed:
        self._claim, self._claim_token = claim, token
        return Claimed(claim)

    def still_holds(self) -> bool:
        """Whether this attempt's claim is still the partition's (one read)."""
        if self._claim is None:
            return False
        record, _ = read_record(self.store, self.layout)
        return record is not None and record.claim == self._claim

    def checkpointer(self, *, key: str | None = None, background: bool = True,
                     log: Log | None = None) -> Checkpointer:
        """This attempt's checkpointer: it restores from any attempt's checkpoints of
        ``key`` (default: the fingerprint) and writes and prunes only its own folder."""
        if self._claim is None:
            raise ConfigError(f"{self.describe()}: claim() the partition before checkpointing")
        root = self.layout.checkpoint_root(key or self.fingerprint or "none")
        return Checkpointer(self.store, root, run_id=self.run_id, background=background,
                            attempt=attempt_folder(self._claim.nonce), log=log or self.log)

    # -- commit ---------------------------------------------------------------------------

    def commit(self, value: Any, *, extra: Mapping[str, Any] | None = None,
               metadata: Mapping[str, Any] | None = None, ledger: Ledger | None = None,
               one_row_per_input: bool = True) -> Committed | Reused:
        """Encode ``value`` (and ``extra`` objects: role -> value), write them under
        attempt-unique names, then the record, conditionally (see the module). With a
        ``ledger`` (a stage's), first prove the output complete: every batch in it exactly
        once, and ``value`` and the ``quarantine`` extra holding exactly its rows;
        otherwise ``IncompleteCommit`` and nothing is written."""
        if ledger is not None:
            quarantine = (extra or {}).get("quarantine")
            ledger.verify_commit(where=self.describe(), rows_out=len(value),
                                 rows_quarantined=0 if quarantine is None else len(quarantine),
                                 one_row_per_input=one_row_per_input)
        encoded = formats.encode(value)
        objects = {"data": (encoded.data, encoded.extension)} if encoded.data else {}
        for role, obj in (extra or {}).items():
            more = formats.encode(obj)
            objects[role] = (more.data, more.extension)
        return self.commit_objects(objects, format=encoded.format, rows=encoded.rows,
                                   metadata=metadata)

    def commit_objects(self, objects: Mapping[str, tuple[bytes | memoryview, str]], *,
                       format: str, rows: int | None,
                       metadata: Mapping[str, Any] | None = None) -> Committed | Reused:
        """``commit`` for objects already encoded (role -> (bytes, extension))."""
        if self.damage is not None:
            raise self._damaged()
        stored = [self._write(role, data, extension)
                  for role, (data, extension) in objects.items()]
        return self._publish(stored, format=format, rows=rows, metadata=metadata)

    def commit_batches(self, checkpointer: Checkpointer, outcome: "Batches", *,
                       ledger: Ledger, quarantine: Any = None,
                       metadata: Mapping[str, Any] | None = None,
                       one_row_per_input: bool = True) -> Committed | Reused:
        """Commit a stage's output without writing it again: the valid-row shards its
        checkpoints already wrote become the partition's data objects, in batch order;
        only the batches after them (``outcome.tail``), the ``quarantine`` frame and the
        record are written. First proven complete against the ``ledger`` (the shards and
        the tail tile every batch, each with the ledger's rows); otherwise
        ``IncompleteCommit`` and nothing is written. The record's content version is the
        ledger's ordered digest of its batches, whatever the shards' boundaries."""
        if self.damage is not None:
            raise self._damaged()
        shard_root = checkpointer.prefix[len(self.layout.prefix):]
        parts = [(first, stop, obj.rows if obj.rows is not None else
                  ledger.span(first, stop)[0]) for obj, (first, stop) in outcome.shards]
        covered = parts[-1][1] if parts else 0
        tail_rows = sum(t.num_rows for t in outcome.tail)
        if covered < ledger.plan.batches or not parts:  # (no batch at all: one empty part)
            parts.append((covered, ledger.plan.batches, tail_rows))
        ledger.verify_commit(where=self.describe(), rows_out=sum(p[2] for p in parts),
                             rows_quarantined=0 if quarantine is None else len(quarantine),
                             one_row_per_input=one_row_per_input, parts=parts)
        stored = [obj.model_copy(update={"role": "data", "name": shard_root + obj.name})
                  for obj, _ in outcome.shards]
        self._check_promoted(stored, [span for _, span in outcome.shards], checkpointer)
        if outcome.tail and (tail_rows or not stored):
            stored.append(self._write("data", parquet.dumps_table(tables.concat(outcome.tail)),
                                      parquet.EXTENSION, rows=tail_rows))
        if quarantine is not None and len(quarantine):
            more = formats.encode(quarantine)
            stored.append(self._write("quarantine", more.data, more.extension))
        digests = ledger.digests
        return self._publish(stored, format=formats.BATCHES_FORMAT, rows=ledger.rows_out,
                             metadata=metadata, dtypes=outcome.dtypes,
                             content=tables.content_version(digests) if digests else None)

    def _check_promoted(self, stored: Sequence[StoredObject],
                        spans: Sequence[tuple[int, int]], checkpointer: Checkpointer) -> None:
        """Shards restored from another attempt's folder: still there, whole (their writer,
        a zombie, prunes only what its own newest cursors do not name, but a record must
        never name a missing object). One stat each; shards of this attempt need none."""
        own = checkpointer.own[len(self.layout.prefix):]
        for obj, (first, stop) in zip(stored, spans, strict=True):
            if obj.name.startswith(own):
                continue
            problems = check_sizes(self.store, self.layout, _named([obj]))
            if problems:
                raise IncompleteCommit(
                    f"{self.describe()}: a checkpoint shard this attempt resumed from "
                    f"changed before its commit ({problems[0]}); nothing was committed. "
                    "Re-materialize the partition: it recomputes the missing batches",
                    missing_batches=list(range(first, stop)))

    def _write(self, role: str, data: bytes | memoryview, extension: str,
               rows: int | None = None) -> StoredObject:
        put = self.store.put(self.layout.key(object_name(role, self.run_id, extension)), data)
        return StoredObject(role=role, name=put.key.rpartition("/")[2], size=put.size,
                            digest=put.digest, algorithm=put.algorithm, rows=rows)

    def _publish(self, stored: list[StoredObject], *, format: str, rows: int | None,
                 metadata: Mapping[str, Any] | None, content: str | None = None,
                 dtypes: Mapping[str, str] | None = None) -> Committed | Reused:
        """Write the record naming ``stored``, conditionally (see the module)."""
        seen = self._seen
        generation = self._claim.generation if self._claim else (
            (seen.generation if seen else 0) + 1)
        version = Manifest(
            asset=list(self.layout.asset), partition=self.layout.partition, format=format,
            objects=stored, rows=rows, fingerprint=self.fingerprint, run_id=self.run_id,
            created_at=_now(), metadata=dict(metadata or {}), generation=generation,
            content=content, dtypes=dict(dtypes or {}),
        )
        token = self._claim_token if self._claim else (seen.token if seen else None)
        retired = self._retired(version.created_at)
        try:
            put = self.store.put(
                self.layout.manifest,
                manifest.encode(list(self.layout.asset), self.layout.partition, version, None,
                                retired),
                if_absent=token is None, if_match=token,
            )
        except CommitConflict as exc:
            return self._lost_race(version, exc)
        return self._done(Record(manifest=version.with_token(put.token), claim=None,
                                 token=put.token, retired=retired))

    def _retired(self, now: str) -> list[Retired]:
        """The replaced version's objects, retired now, and those retired within the grace
        (older ones are plain orphans to GC, by their write time)."""
        seen = self._seen
        if seen is None:
            return []
        cutoff = datetime.fromisoformat(now).timestamp() - self.gc_grace_seconds
        kept = [r for r in seen.retired
                if datetime.fromisoformat(r.since).timestamp() > cutoff]
        replaced = [Retired(name=o.name, since=now) for o in seen.manifest.objects] \
            if seen.manifest else []
        return kept + replaced

    def _lost_race(self, version: Manifest, exc: CommitConflict) -> Committed | Reused:
        current, damage = read_record(self.store, self.layout)
        where = self.store.uri_of(self.layout.manifest)
        if damage is not None:
            raise LeaseLost(f"{self.describe()}: {damage}; run {self.run_id} did not commit. "
                            f"{damaged_record_fix(where)}", uri=where) from exc
        if current is not None and current.manifest is not None and \
                current.manifest.objects == version.objects:
            return self._done(current)  # ours landed; its answer was lost
        if current is None:
            raise LeaseLost(
                f"{self.describe()}: its record {where}, holding this attempt's claim, was "
                f"deleted while run {self.run_id} computed it; nothing was committed (this "
                "attempt's objects are garbage-collected) and no claim generation is reused. "
                "Re-materialize the partition", uri=where) from exc
        if self._claim is not None and current.claim != self._claim:
            holder = current.claim or current.manifest
            assert holder is not None
            raise LeaseLost(
                f"{self.describe()}: run {self.run_id} held claim generation "
                f"{self._claim.generation}, but run {holder.run_id} took generation "
                f"{current.generation} since; a newer attempt owns the partition, so this one "
                "must not commit (nothing to do: the newer attempt commits it)", uri=where,
            ) from exc
        if self._claim is None and current.manifest is not None and self.fingerprint and \
                current.manifest.fingerprint == self.fingerprint and \
                not check_sizes(self.store, self.layout, current.manifest):
            self._seen = current  # it ends reusing what it found
            return Reused(current.manifest)
        by = f" by run {current.manifest.run_id}" if current.manifest else ""
        raise CommitConflict(
            f"{self.describe()} was committed{by} while run {self.run_id} was writing it; "
            "this attempt's objects were not committed and will be garbage-collected. "
            "Re-run the partition if the committed version is not the one you want", uri=where,
        ) from exc

    def _done(self, record: Record) -> Committed:
        assert record.manifest is not None
        self._seen = record
        self._claim = self._claim_token = None
        try:
            gc.collect_committed(self.store, self.layout.prefix, record, self.gc_grace_seconds)
        except StorageError as exc:  # committed: what is left is garbage, not a failure
            self.log.warning(f"{self.describe()} is committed, but cleaning up after it "
                             f"failed ({exc}); a later commit or collect_garbage() retries")
        return Committed(record.manifest)

    def _damaged(self) -> CorruptObject:
        assert self.damage is not None
        where = self.store.uri_of(self.layout.manifest)
        return CorruptObject(
            f"{self.describe()}: its manifest and claim are damaged ({self.damage}). "
            f"{damaged_record_fix(where)}", uri=where, expected=self.damage.expected,
            actual=self.damage.actual)


class Batches(Protocol):
    """What ``commit_batches`` needs of a finished stage loop (``batches.Outcome``)."""

    @property
    def shards(self) -> list[tuple[StoredObject, tuple[int, int]]]: ...

    @property
    def tail(self) -> list[pa.Table]: ...

    @property
    def dtypes(self) -> dict[str, str]: ...


def _named(objects: Sequence[StoredObject]) -> Manifest:
    """A manifest naming just ``objects`` (for ``check_sizes``)."""
    return Manifest(asset=[], partition=None, format="", objects=list(objects), rows=None,
                    fingerprint=None, run_id="", created_at="")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
