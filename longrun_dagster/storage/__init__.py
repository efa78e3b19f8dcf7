"""Atomic object storage: a local filesystem and an S3 backend behind one interface."""

from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from longrun_dagster.errors import ConfigError
from longrun_dagster.storage.base import ObjectInfo as ObjectInfo
from longrun_dagster.storage.base import ObjectStore as ObjectStore
from longrun_dagster.storage.base import PutResult as PutResult
from longrun_dagster.storage.local import LocalStore as LocalStore

if TYPE_CHECKING:
    from longrun_dagster.storage.s3 import S3Store as S3Store


def __getattr__(name: str) -> Any:
    # S3Store needs botocore (the s3 extra); the local store does not
    if name == "S3Store":
        from longrun_dagster.storage.s3 import S3Store

        return S3Store
    raise AttributeError(f"module 'longrun_dagster.storage' has no attribute {name!r}")


def open_store(uri: str, *, s3_client: Any = None) -> ObjectStore:
    """The store for ``uri``: ``file:///abs/path``, a plain path, or ``s3://bucket/prefix``.

    For S3, pass a boto3 client (in Dagster: ``S3Resource(...).get_client()``); without
    one, boto3's default client is built from the environment.
    """
    parsed = urlparse(checked_base_uri(uri))
    if parsed.scheme in ("", "file"):
        path = unquote(parsed.path) if parsed.scheme == "file" else uri
        return LocalStore(Path(path).expanduser())
    if parsed.scheme == "s3":
        try:
            from longrun_dagster.storage.s3 import S3Store
            if s3_client is None:
                import boto3

                s3_client = boto3.client("s3")
        except ImportError as exc:
            raise ConfigError(
                f"base URI {uri!r} needs boto3, which is not installed ({exc}); install "
                "longrun-dagster[s3]") from exc
        return S3Store(s3_client, parsed.netloc, parsed.path.strip("/"))
    raise AssertionError(uri)  # checked_base_uri refused it


def checked_base_uri(uri: str) -> str:
    """``uri`` if it is a base URI ``open_store`` can open, else a ``ConfigError`` that
    names the fix; nothing is opened."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise ConfigError(
                f"base URI {uri!r} names host {parsed.netloc!r}; write file:///absolute/path "
                "(three slashes) or a plain path"
            )
        path = unquote(parsed.path) if parsed.scheme == "file" else uri
        if not path:
            raise ConfigError("empty base URI; give file:///path, a path, or s3://bucket/prefix")
        _absolute(uri, Path(path).expanduser())
        return uri
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ConfigError(f"base URI {uri!r} has no bucket; write s3://bucket/prefix")
        return uri
    raise ConfigError(
        f"unsupported base URI scheme {parsed.scheme!r} in {uri!r}; use file:///path, a "
        "local path, or s3://bucket/prefix"
    )


def _absolute(uri: str, path: Path) -> None:
    """A local base must be absolute: a relative one is resolved against each process's
    working directory, and the CLI's, the daemon's and a run worker's differ."""
    if path.is_absolute():
        return
    first = path.parts[0] if path.parts else ""
    if first in ("s3", "file", "gs", "http", "https"):  # s3//bucket/x: a colon went missing
        fixed = f"{first}://{'/' if first == 'file' else ''}{'/'.join(path.parts[1:])}"
        raise ConfigError(f"base URI {uri!r} is a relative path; did you mean {fixed!r}?")
    raise ConfigError(
        f"base URI {uri!r} is a relative path, which each process (the CLI, the daemon, a "
        f"run worker) would resolve against its own working directory; give an absolute "
        f"path or file:///absolute/path, e.g. {path.absolute().as_uri()!r}")
