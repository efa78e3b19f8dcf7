"""Partition keys and asset paths encoded so that no key can escape or share a folder."""

import hashlib
from urllib.parse import quote

from longrun_dagster.errors import ConfigError

# Besides ASCII letters and digits. Never '/', '%', '\\', NUL; never '~' (quote() keeps it
# unless told otherwise), which marks a shortened key, so no user key can encode to a
# shortened key's name.
_SAFE = "-_.=+,@"
_MAX_ENCODED = 120
UNPARTITIONED = "_unpartitioned"
PARTITION_FOLDER_PREFIX = "p="


def encode_component(text: str) -> str:
    """One safe path component for any partition key: ``..``, ``/``, ``\\``, ``~``, NUL,
    control characters and unicode are percent-encoded; very long keys are cut and suffixed
    with ``~`` and a SHA-256 of the whole key, so the result is at most ~140 bytes and still
    unique."""
    return _shorten(text, _escape(text))


def encode_asset_component(text: str) -> str:
    """``encode_component`` for one part of an asset path, which also never starts with
    ``_`` nor holds ``=``: names inside an asset's folder that start with ``_``
    (``_unpartitioned``, ``_checkpoints``, ``_manifest.json``) or look like ``p=...`` are
    the asset's own, so no other asset's folder can be one of them."""
    encoded = _escape(text).replace("=", "%3D")
    if encoded.startswith("_"):
        encoded = "%5F" + encoded[1:]
    return _shorten(text, encoded)


def asset_prefix(asset_path: list[str] | tuple[str, ...]) -> str:
    """``<asset path>/``: the folder that holds an asset's partitions (``""`` for ``[]``)."""
    return "".join(encode_asset_component(p) + "/" for p in asset_path)


def partition_prefix(asset_path: list[str] | tuple[str, ...], partition: str | None) -> str:
    """``<asset path>/p=<encoded partition>/`` for a partition, or
    ``<asset path>/_unpartitioned/`` for an unpartitioned asset. For distinct (asset path,
    partition) pairs, neither result is a prefix of the other. Every location of an
    asset's partition is named here, so this is where a key that is not a ``str`` is
    refused (``ConfigError``)."""
    _require_str(asset_path, partition)
    if partition is None:
        leaf = UNPARTITIONED
    else:
        leaf = PARTITION_FOLDER_PREFIX + encode_component(partition)
    return f"{asset_prefix(asset_path)}{leaf}/"


def _require_str(asset_path: list[str] | tuple[str, ...], partition: object) -> None:
    # quote() fails on an int or a date with a bare TypeError, and takes bytes: b"k"
    # would share the folder of "k".
    for part in asset_path:
        if not isinstance(part, str):
            raise ConfigError(
                f"asset path {list(asset_path)!r} holds {part!r}, a "
                f"{type(part).__qualname__}: asset path parts are strings; pass str({part!r})"
            )
    if partition is not None and not isinstance(partition, str):
        raise ConfigError(
            f"partition key {partition!r} of asset {'/'.join(asset_path)} is a "
            f"{type(partition).__qualname__}: partition keys are strings, as Dagster's are; "
            "pass str(key)"
        )


def _escape(text: str) -> str:
    # quote() writes '%' only as %XX, and never %7E or %2E (it keeps '~' and '.'), so each
    # replacement below stays one-to-one.
    encoded = quote(text, safe=_SAFE).replace("~", "%7E")
    if encoded.startswith("."):
        encoded = "%2E" + encoded[1:]  # '.', '..' and hidden files are never produced
    return encoded or "%empty"  # quote() only writes %XX in hex, so no key encodes to this


def _shorten(text: str, encoded: str) -> str:
    if len(encoded) <= _MAX_ENCODED:
        return encoded
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:24]
    return f"{encoded[:_MAX_ENCODED - 30]}~{digest}"
