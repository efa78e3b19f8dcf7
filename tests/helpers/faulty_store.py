"""FaultyStore: a real store behind a wrapper that counts every storage call and fails
the N-th one on demand (once, or for good), as SQLite's test harness fails its N-th I/O."""

import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum

from longrun_dagster.errors import StorageError
from longrun_dagster.storage import ObjectInfo, ObjectStore, PutResult

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_ANY_ID = re.compile(r"\b(?=[0-9a-f]*[a-f])[0-9a-f]{8,}\b")  # keeps all-digit step numbers
INJECTED = "injected storage fault"
"""In the message of every error this wrapper raises, so a test can tell it apart."""


class Fault(Enum):
    """How an armed store fails its N-th call."""

    ONCE = "once"
    """Only call N fails (a transient error: a 503, a reset connection)."""
    FOR_GOOD = "for good"
    """Call N and every later call fail (the endpoint or the disk is gone)."""


@dataclass(frozen=True)
class Call:
    """One storage call as the wrapper saw it: its 1-based number, kind and key."""

    number: int
    kind: str
    key: str
    failed: bool

    def shape(self) -> str:
        """The call with run ids, nonces and uuids blanked, to compare across runs."""
        return f"{self.kind} {_ANY_ID.sub('*', _UUID.sub('<run>', self.key))}"


class FaultyStore(ObjectStore):
    """Delegates every call to ``inner``; counts puts, gets, stats, lists, deletes and
    clean-ups from any thread (checkpoints are written on a background thread) and fails
    the armed call with ``StorageError`` before it reaches ``inner``."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.uri = inner.uri
        self._lock = threading.Lock()
        self.calls: list[Call] = []
        self._fail_at: int | None = None
        self._fault = Fault.ONCE

    def arm(self, n: int, fault: Fault) -> None:
        """Count from zero again and fail call ``n`` (1-based) as ``fault`` says."""
        with self._lock:
            self.calls, self._fail_at, self._fault = [], n, fault

    def disarm(self) -> None:
        """Count from zero again and fail nothing."""
        with self._lock:
            self.calls, self._fail_at = [], None

    @property
    def injected(self) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.failed]

    def _call(self, kind: str, key: str) -> None:
        with self._lock:
            number = len(self.calls) + 1
            at = self._fail_at
            fail = at is not None and (number == at or
                                       (self._fault is Fault.FOR_GOOD and number > at))
            self.calls.append(Call(number, kind, key, fail))
        if fail:
            raise StorageError(f"{INJECTED} at storage call {number} ({kind} {key})",
                               uri=f"{self.inner.uri.rstrip('/')}/{key}")

    def uri_of(self, key: str) -> str:
        return self.inner.uri_of(key)  # names a key; no storage call

    def put(self, key: str, data: bytes | memoryview, *, if_absent: bool = False,
            if_match: str | None = None) -> PutResult:
        self._call("put", key)
        return self.inner.put(key, data, if_absent=if_absent, if_match=if_match)

    def get(self, key: str) -> tuple[bytes, str]:
        self._call("get", key)
        return self.inner.get(key)

    def stat(self, key: str) -> ObjectInfo:
        self._call("stat", key)
        return self.inner.stat(key)

    def exists(self, key: str) -> bool:
        self._call("stat", key)
        return self.inner.exists(key)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        self._call("list", prefix)
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self._call("delete", key)
        self.inner.delete(key)

    def clean_incomplete(self, prefix: str, older_than_s: float, *,
                         at_once_under: str | None = None) -> int:
        self._call("clean", prefix)
        return self.inner.clean_incomplete(prefix, older_than_s, at_once_under=at_once_under)
