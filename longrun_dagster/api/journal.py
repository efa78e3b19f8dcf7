"""The answers of an API stage's partition, kept as they arrive, so that no relaunch pays
for a request twice.

Each answer (or a request given up) is a ``Record`` keyed by its request key (a hash of
the request body and the model). The journal writes the records that arrived since its
last write as one small JSON-lines object every ``flush_seconds`` (a background thread),
through the store's atomic ``put``:

    <partition folder>/_answers/<writer>-<seq>-<digest>.jsonl

The digest (BLAKE3 of the bytes) is in the name, so a damaged object is recognised and
skipped on restore (its requests are sent again) instead of trusted. Answers do not depend
on the stage's fingerprint: a change of ``parse`` or of the schema, or a failed budget,
reuses them; a changed request has another key. They stay after the commit (a later
change of ``parse`` does not pay again) until the partition's folder goes.
"""

import json
import threading
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import blake3

from longrun_dagster.errors import ObjectNotFound, StorageError
from longrun_dagster.storage import ObjectStore

ANSWERS = "_answers/"
FLUSH_SECONDS = 0.25


@dataclass(frozen=True)
class Record:
    """What became of one request."""

    key: str
    ok: bool
    body: dict[str, Any] | None
    """The response's JSON (``ok``)."""
    tries: int
    status: int | None = None
    reason: str = ""
    """Why it was given up (not ``ok``): ``http_400``, ``retries_exhausted``, ..."""
    error: str = ""

    def line(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def of(cls, line: str) -> "Record":
        return cls(**json.loads(line))


class Journal:
    """The answers journal of one partition (``prefix`` is its folder)."""

    def __init__(self, store: ObjectStore, prefix: str, *, log: Any,
                 flush_seconds: float = FLUSH_SECONDS) -> None:
        self.store, self.folder, self.log = store, prefix + ANSWERS, log
        self.flush_seconds = flush_seconds
        self._writer = uuid.uuid4().hex[:12]
        self._seq = 0
        self._buffer: list[Record] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.written = 0

    # -- restore -----------------------------------------------------------------------

    def restore(self) -> dict[str, Record]:
        """Every answer kept for this partition, by request key (answers win over given-up
        requests, which a new attempt tries again); damaged objects are skipped."""
        names = [info.key for info in self.store.list(self.folder)]
        with ThreadPoolExecutor(8, thread_name_prefix="longrun-answers") as pool:
            chunks = list(pool.map(self._read, names))
        answers: dict[str, Record] = {}
        for chunk in chunks:
            for record in chunk:
                if record.ok:
                    answers[record.key] = record
        return answers

    def _read(self, key: str) -> list[Record]:
        try:
            data, _ = self.store.get(key)
        except ObjectNotFound:
            return []
        want = key.rsplit("-", 1)[-1].removesuffix(".jsonl")
        if blake3.blake3(data).hexdigest()[:len(want)] != want or len(want) < 16:
            self.log.warning(f"answers object {self.store.uri_of(key)} is damaged (its "
                             "digest differs from its name); its requests are sent again")
            return []
        try:
            return [Record.of(line) for line in data.decode().splitlines() if line]
        except (ValueError, TypeError) as exc:
            self.log.warning(f"answers object {self.store.uri_of(key)} does not parse "
                             f"({exc}); its requests are sent again")
            return []

    # -- write -------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="longrun-answers",
                                        daemon=True)
        self._thread.start()

    def add(self, record: Record) -> None:
        with self._lock:
            self._buffer.append(record)

    def _run(self) -> None:
        while not self._closed.wait(self.flush_seconds):
            try:
                self.flush()
            except StorageError as exc:  # kept in the buffer: the next flush tries again
                self.log.warning(f"could not keep answers yet: {exc}")

    def flush(self) -> None:
        """Write the records added since the last write (one object), if any."""
        with self._lock:
            records, self._buffer = self._buffer, []
            seq = self._seq = self._seq + 1
        if not records:
            return
        try:
            self._put(seq, records)
        except BaseException:
            with self._lock:
                self._buffer[:0] = records
            raise

    def _put(self, seq: int, records: Iterable[Record]) -> None:
        data = "".join(r.line() + "\n" for r in records).encode()
        digest = blake3.blake3(data).hexdigest()[:24]
        self.store.put(f"{self.folder}{self._writer}-{seq:07d}-{digest}.jsonl", data)
        self.written += data.count(b"\n")

    def close(self) -> None:
        """Stop the writer and write what is left (raises if that fails)."""
        self._closed.set()
        if self._thread is not None:
            self._thread.join()
        self.flush()
