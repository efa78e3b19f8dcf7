"""Partition keys and asset paths encoded so that no key can escape its folder."""

import hashlib
from urllib.parse import quote

# Besides ASCII letters and digits. Never '/', '%', '\\', NUL; never '~', which marks a
# shortened key, so no user key can encode to a shortened key's name.
_SAFE = "-_.=+,@"
_MAX_ENCODED = 120
UNPARTITIONED = "_unpartitioned"


def encode_component(text: str) -> str:
    """One safe path component for any string: ``..``, ``/``, ``\\``, NUL, control
    characters and unicode are percent-encoded; very long keys are cut and suffixed with a
    SHA-256 of the whole key, so the result is at most ~140 bytes and still unique."""
    encoded = quote(text, safe=_SAFE)
    if encoded.startswith("."):
        encoded = "%2E" + encoded[1:]  # '.', '..' and hidden files are never produced
    if not encoded:
        encoded = "%empty"  # quote() only writes %XX in hex, so no key encodes to this
    if len(encoded) > _MAX_ENCODED:
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:24]
        encoded = f"{encoded[:_MAX_ENCODED - 30]}~{digest}"
    return encoded


def partition_prefix(asset_path: list[str] | tuple[str, ...], partition: str | None) -> str:
    """``<asset path>/p=<encoded partition>/`` for a partition, or
    ``<asset path>/_unpartitioned/`` for an unpartitioned asset."""
    parts = [encode_component(p) for p in asset_path]
    leaf = UNPARTITIONED if partition is None else "p=" + encode_component(partition)
    return "/".join([*parts, leaf]) + "/"
