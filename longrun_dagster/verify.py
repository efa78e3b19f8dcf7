"""Verified reads: an object's bytes only once their size and digest match what names them."""

from collections.abc import Callable
from typing import Any

from longrun_dagster.errors import ConfigError, CorruptObject, ObjectNotFound
from longrun_dagster.manifest import StoredObject
from longrun_dagster.storage import ObjectStore
from longrun_dagster.storage.base import new_hasher


def read_verified(store: ObjectStore, key: str, stored: StoredObject, *, owner: str,
                  fix: str, decode: Callable[[bytes], Any] | None = None) -> Any:
    """The object's bytes (or ``decode(bytes)``) if they have the size and digest that
    ``stored`` records, else ``CorruptObject`` naming its URI, ``owner`` (what names it)
    and ``fix``. Damaged bytes are never decoded: a parser fed hostile bytes can crash
    the process or allocate without bound, so the digest is compared first."""
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
    actual = digest_of(data, stored.algorithm, uri)
    if actual != stored.digest:
        raise CorruptObject(
            f"object {uri} fails its {stored.algorithm} check (expected {stored.digest[:16]}"
            f"..., got {actual[:16]}...); {fix}", uri=uri, expected=stored.digest, actual=actual,
        )
    return data if decode is None else decode(data)


def digest_of(data: bytes | memoryview, algorithm: str, uri: str) -> str:
    """The ``algorithm`` digest of ``data``, for any algorithm a manifest may name."""
    try:
        hasher = new_hasher(algorithm)
    except KeyError:
        raise ConfigError(f"{uri} records a {algorithm} digest, which this longrun-dagster "
                          "cannot check; upgrade longrun-dagster") from None
    hasher.update(data)
    return hasher.hexdigest()
