"""The object store contract: bytes in, bytes out, atomically; no Dagster, no formats."""

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import blake3

from longrun_dagster.errors import ConfigError

DIGEST_ALGORITHM = "blake3"
"""What ``put`` checksums new objects with: cryptographic, and ~4x SHA-256 on one core."""


@dataclass(frozen=True)
class ObjectInfo:
    """What a store knows about one object without reading it."""

    key: str
    size: int
    token: str
    """Opaque version token (S3 ETag); pass it back as ``if_match``."""
    modified: float
    """Last-modified time, seconds since the epoch."""


@dataclass(frozen=True)
class PutResult:
    """An object written whole: its key, size, the digest of the bytes sent and the
    algorithm that made it, and its version token."""

    key: str
    size: int
    digest: str
    algorithm: str
    token: str


class ObjectStore(ABC):
    """Atomic object storage under one base URI.

    Keys are relative, ``/``-separated, and never contain ``..``, empty components,
    backslashes or control characters (callers encode user input; see ``keys``).
    ``put`` is all-or-nothing: a reader sees the previous object or the new one whole,
    never a prefix, whatever happens to the writer.
    """

    uri: str

    def uri_of(self, key: str) -> str:
        """The full URI of ``key`` (for logs, errors and metadata)."""
        return f"{self.uri.rstrip('/')}/{check_key(key)}"

    @abstractmethod
    def put(
        self, key: str, data: bytes | memoryview, *, if_absent: bool = False,
        if_match: str | None = None,
    ) -> PutResult:
        """Write ``data`` at ``key`` atomically.

        ``if_absent`` fails with ``CommitConflict`` if ``key`` exists; ``if_match`` fails
        with ``CommitConflict`` unless the current object's token equals it.
        """

    @abstractmethod
    def get(self, key: str) -> tuple[bytes, str]:
        """Read the object at ``key``: its bytes and version token (``ObjectNotFound``)."""

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """Size and token of ``key`` without reading it (``ObjectNotFound``)."""

    @abstractmethod
    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every committed object whose key starts with ``prefix`` (no temporaries)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; removing a missing key is not an error."""

    @abstractmethod
    def clean_incomplete(self, prefix: str, older_than_s: float, *,
                         at_once_under: str | None = None) -> int:
        """Remove leftovers of interrupted writes under ``prefix`` (temp files, unfinished
        multipart uploads) older than ``older_than_s`` seconds, and those under
        ``at_once_under`` whatever their age; return how many."""

    def exists(self, key: str) -> bool:
        from longrun_dagster.errors import ObjectNotFound

        try:
            self.stat(key)
        except ObjectNotFound:
            return False
        return True


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe relative object key, else raise ``ConfigError``."""
    parts = key.split("/")
    bad = (
        not key
        or key.startswith("/")
        or any(p in ("", ".", "..") for p in parts)
        or any(ord(c) < 32 or c in "\\\x7f" for c in key)
    )
    if bad:
        raise ConfigError(
            f"unsafe object key {key!r}: keys are relative '/'-separated paths without "
            "'..', empty parts, backslashes or control characters; encode user input with "
            "longrun_dagster.storage.keys.encode_component"
        )
    return key


class Hasher(Protocol):
    """What ``hashlib`` and ``blake3`` hashers share."""

    def update(self, data: bytes | memoryview, /) -> object: ...

    def hexdigest(self) -> str: ...


def _blake3() -> Hasher:
    # AUTO: large updates are split across every core (the GIL is released meanwhile).
    return blake3.blake3(max_threads=blake3.blake3.AUTO)


HASHERS: dict[str, Callable[[], Hasher]] = {"blake3": _blake3, "sha256": hashlib.sha256}
"""Every digest algorithm a manifest may name; new objects get ``DIGEST_ALGORITHM``."""


def new_hasher(algorithm: str = DIGEST_ALGORITHM) -> Hasher:
    """An empty hasher for ``algorithm`` (``KeyError`` if this library has none)."""
    return HASHERS[algorithm]()
