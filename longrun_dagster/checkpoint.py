"""Checkpoints inside a partition: atomic, verified, resumable; no Dagster here.

A checkpoint is a cursor (``cursor-<step>.json``, a checksummed manifest record) naming the
objects it needs: result shards accumulated so far (a batch stage appends one per save)
and optionally a state object (a custom loop's model/optimizer state). Objects are written
first under unique names, the cursor last, so a crash leaves the previous checkpoint
whole. ``restore`` takes the newest cursor whose objects all verify and says in the log
when it had to fall back past a damaged one.

A failed write fails the checkpointer for good: every later ``save`` and ``flush`` raises
that error, so no later cursor can name the shards after it and skip the failed save's
work; the attempt ends and the next one resumes from the last cursor that landed.

Each shard records the span of steps it holds (``[previous saved step, its step)``), so a
caller can check on ``restore`` that a cursor's shards tile its steps (``accept``).

Given an ``attempt`` name, a checkpointer writes and prunes only its own folder
``<prefix><attempt>/``, and restores from any attempt's folder under ``prefix``: an older
attempt that wakes up (a zombie) can then never overwrite or prune the live attempt's
cursors and shards, while the live one still resumes from what the zombie saved.
"""

import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from longrun_dagster import formats, manifest
from longrun_dagster.errors import CorruptObject, NewerFormat, ObjectNotFound
from longrun_dagster.manifest import Manifest, StoredObject
from longrun_dagster.storage import ObjectStore
from longrun_dagster.verify import read_verified

CURSOR_PREFIX = "cursor-"
SHARD = "shard:"
STEP_DIGITS = 12
_log = logging.getLogger("longrun_dagster.checkpoint")
ShardData = bytes | memoryview | Callable[[], bytes | memoryview]
NewShard = tuple[str, ShardData] | tuple[str, ShardData, int]
"""(kind, bytes) or (kind, bytes, rows in it)."""


@dataclass(frozen=True)
class Restored:
    """A verified checkpoint: the step it was taken after, its state, its shards' bytes."""

    step: int
    state: Any
    shards: list[tuple[str, bytes]]
    """(kind, bytes) of every shard saved so far, in save order."""
    metadata: dict[str, Any]
    skipped: list[str] = field(default_factory=list)
    """Newer checkpoints that failed verification, each with why (also logged)."""
    stored_shards: list[StoredObject] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)
    """The steps ``[first, stop)`` each of ``shards`` holds, in the same order."""


class Checkpointer:
    """Save and restore checkpoints of one unit of work under ``prefix`` of ``store``.

    ``save(step, state)`` is the whole API for a custom loop; a batch stage also passes
    ``new_shards`` (encoded results since the last save), which accumulate across saves.
    With ``background=True`` a save returns once its bytes are in host memory and is
    written by one background thread; never more than one write is in flight. A failed
    write (background or not) is sticky: every later save or ``flush()`` raises its error.
    With ``attempt``, writes go to
    ``<prefix><attempt>/`` only (see the module's docstring).
    """

    def __init__(self, store: ObjectStore, prefix: str, *, run_id: str = "local",
                 keep: int = 3, background: bool = False, attempt: str | None = None,
                 log: logging.Logger | logging.LoggerAdapter[Any] | None = None) -> None:
        self.store = store
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.own = f"{self.prefix}{attempt}/" if attempt else self.prefix
        """Where this checkpointer writes; names in cursors are relative to ``prefix``."""
        self.run_id = run_id
        self.keep = max(2, keep)  # the previous one is the fallback for a damaged newest
        self.log = log or _log
        self.saves = 0
        self._shards: list[StoredObject] = []
        self._spans: list[tuple[int, int]] = []
        self._step = 0  # the step of the last cursor written or restored
        self._failed: BaseException | None = None
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, "longrun-checkpoint") if background else None
        self._inflight: Future[None] | None = None

    # -- saving ------------------------------------------------------------------------

    def save(self, step: int, state: Any = None, *,
             new_shards: Sequence[NewShard] = (),
             metadata: dict[str, Any] | None = None) -> None:
        """Checkpoint after ``step``: ``state`` (DataFrame, tensor dict, JSON-able, or None)
        plus ``new_shards`` ((kind, bytes) pairs, or (kind, bytes, rows) to record its row
        count) appended to those of earlier saves. A shard may be a function returning its
        bytes: it then runs in the writer thread, so encoding does not hold up the caller
        either."""
        self.flush()
        encoded = formats.encode(state) if state is not None else None
        job = (step, encoded, list(new_shards), dict(metadata or {}))
        if self._pool is None:
            self._write(*job)
            return
        self._inflight = self._pool.submit(self._write, *job)

    def flush(self) -> None:
        """Wait for the background write in flight; raise a failed write's error (this
        one's or any earlier one's: a failure is sticky)."""
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            wait_for([inflight])
        if self._failed is not None:
            raise self._failed

    @property
    def step(self) -> int:
        """The step of the last checkpoint written or restored (0: none)."""
        return self._step

    def shards(self, kind: str) -> list[tuple[StoredObject, tuple[int, int]]]:
        """The shards of ``kind`` the last checkpoint written or restored names, in save
        order, each with its span of steps; names are relative to ``prefix``."""
        with self._lock:
            return [(o, span) for o, span in zip(self._shards, self._spans, strict=True)
                    if o.role == f"{SHARD}{kind}"]

    @property
    def failed(self) -> BaseException | None:
        """The error of the write that failed this checkpointer for good, if any."""
        return self._failed

    def close(self) -> None:
        """Wait for the write in flight and stop the writer thread (a later ``save``
        writes in the caller's thread)."""
        try:
            self.flush()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def _write(self, step: int, encoded: formats.Encoded | None,
               new_shards: list[NewShard],
               metadata: dict[str, Any]) -> None:
        try:
            self._write_cursor(step, encoded, new_shards, metadata)
        except BaseException as exc:
            self._failed = self._failed or exc
            raise

    def _write_cursor(self, step: int, encoded: formats.Encoded | None,
                      new_shards: list[NewShard],
                      metadata: dict[str, Any]) -> None:
        with self._lock:
            if self._failed is not None:
                raise self._failed
            attempt = uuid.uuid4().hex[:12]
            objects = list(self._shards)
            for i, new in enumerate(new_shards):
                kind, shard = new[0], new[1]
                data = shard() if callable(shard) else shard
                rows = new[2] if len(new) == 3 else None
                objects.append(self._put(f"shard-{step:0{STEP_DIGITS}d}-{i}-{attempt}.parquet",
                                         f"{SHARD}{kind}", data, rows=rows))
            shards = list(objects)
            spans = self._spans + [(self._step, step)] * len(new_shards)
            fmt = "none"
            if encoded is not None:
                objects.append(self._put(f"state-{step:0{STEP_DIGITS}d}-{attempt}."
                                         f"{encoded.extension}", "state", encoded.data))
                fmt = encoded.format
            cursor = Manifest(
                asset=[], partition=None, format=fmt, objects=objects, rows=None,
                fingerprint=None, run_id=self.run_id,
                created_at=datetime.now(UTC).isoformat(timespec="milliseconds"),
                metadata={**metadata, "step": step, "spans": [list(s) for s in spans]},
            )
            self.store.put(self._cursor_key(step), manifest.encode([], None, cursor, None))
            self._shards, self._spans, self._step = shards, spans, step
            self.saves += 1
            self._prune()

    def _put(self, name: str, role: str, data: bytes | memoryview,
             rows: int | None = None) -> StoredObject:
        put = self.store.put(self.own + name, data)
        return StoredObject(role=role, name=self._name(put.key), size=put.size,
                            digest=put.digest, algorithm=put.algorithm, rows=rows)

    def _name(self, key: str) -> str:
        return key[len(self.prefix):]

    def _cursor_key(self, step: int) -> str:
        return f"{self.own}{CURSOR_PREFIX}{step:0{STEP_DIGITS}d}.json"

    def _cursors(self, under: str) -> list[str]:
        """Cursor keys under ``under`` (any attempt's folder), newest step first."""
        keys = [i.key for i in self.store.list(under)
                if i.key.rpartition("/")[2].startswith(CURSOR_PREFIX)]
        return sorted(keys, key=lambda k: (k.rpartition("/")[2], k), reverse=True)

    def _prune(self) -> None:
        """Keep this attempt's newest ``keep`` cursors and the objects they name; delete the
        rest of this attempt's folder (never another attempt's)."""
        cursors = [k for k in self._cursors(self.own) if k.rpartition("/")[0] + "/" == self.own]
        for key in cursors[self.keep:]:
            self.store.delete(key)
        named: set[str] = set()
        for key in cursors[: self.keep]:
            try:
                named |= {o.name for o in self._read_cursor(key).objects}
            except (CorruptObject, ObjectNotFound, NewerFormat):
                return  # a damaged cursor: keep everything for restore to sort out
        for info in self.store.list(self.own):
            folder, _, leaf = info.key.rpartition("/")
            if folder + "/" != self.own or leaf.startswith(CURSOR_PREFIX):
                continue
            if self._name(info.key) not in named:
                self.store.delete(info.key)

    # -- restoring -----------------------------------------------------------------------

    def restore(self, accept: Callable[[Restored], str | None] | None = None
                ) -> Restored | None:
        """The newest checkpoint whose cursor and objects all verify and that ``accept``
        finds nothing wrong with (it returns why not, or None), or None."""
        self.flush()
        skipped: list[str] = []
        for key in self._cursors(self.prefix):
            try:
                restored = self._load(key, skipped)
                wrong = accept(restored) if accept is not None else None
            except (CorruptObject, ObjectNotFound, NewerFormat) as exc:
                wrong = str(exc)
            if wrong is not None:
                reason = f"{self.store.uri_of(key)}: {wrong}"
                skipped.append(reason)
                self.log.warning(f"checkpoint is damaged or incomplete, falling back to an "
                                 f"older one: {reason}")
                continue
            with self._lock:
                self._shards, self._spans = restored.stored_shards, restored.spans
                self._step = restored.step
            return restored
        if skipped:
            where = self.store.uri_of(self.prefix.rstrip("/"))
            self.log.warning(f"no checkpoint under {where} verifies ({len(skipped)} damaged); "
                             "starting from the beginning")
        return None

    def _read_cursor(self, key: str) -> Manifest:
        data, token = self.store.get(key)
        record = manifest.decode(data, token, self.store.uri_of(key))
        if record.manifest is None:
            raise CorruptObject(f"checkpoint cursor {self.store.uri_of(key)} names nothing",
                                uri=self.store.uri_of(key), expected="a cursor",
                                actual="a claim")
        return record.manifest

    def _load(self, key: str, skipped: list[str]) -> Restored:
        cursor = self._read_cursor(key)
        owner = f"checkpoint cursor {self.store.uri_of(key)}"
        fix = "this checkpoint is skipped and an older one used"
        shards, stored_shards, state = [], [], None
        for stored in cursor.objects:
            data = read_verified(self.store, self.prefix + stored.name, stored, owner=owner,
                                 fix=fix)
            if stored.role.startswith(SHARD):
                shards.append((stored.role[len(SHARD):], data))
                stored_shards.append(stored)
            else:
                state = formats.decode(cursor.format, data)
        meta = dict(cursor.metadata)
        step = int(meta.pop("step"))
        spans = _spans(meta.pop("spans", None), len(shards), self.store.uri_of(key))
        return Restored(step, state, shards, meta, skipped, stored_shards, spans)

    def forget(self) -> None:
        """Start over without deleting anything: the next save names only what is saved
        from now on (for a restored checkpoint the caller rejects)."""
        with self._lock:
            self._shards, self._spans, self._step = [], [], 0

    def clear(self) -> None:
        """Delete every checkpoint under the prefix, every attempt's (once the partition is
        committed they are dead weight)."""
        self.flush()
        for info in self.store.list(self.prefix):
            self.store.delete(info.key)
        with self._lock:
            self._shards, self._spans, self._step = [], [], 0


def _spans(raw: Any, shards: int, uri: str) -> list[tuple[int, int]]:
    """The spans a cursor records for its shards; a cursor without them (written before
    spans were recorded) or with the wrong number is not trusted."""
    if raw is None and shards == 0:
        return []
    if not isinstance(raw, list) or len(raw) != shards or not all(
            isinstance(s, list) and len(s) == 2 and all(type(v) is int for v in s)
            for s in raw):
        raise CorruptObject(f"checkpoint cursor {uri} does not record the steps each of its "
                            f"{shards} shards holds", uri=uri, expected=shards,
                            actual=len(raw) if isinstance(raw, list) else "none")
    return [(s[0], s[1]) for s in raw]
