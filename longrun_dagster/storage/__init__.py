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
        return LocalStore(Path(path).expanduser())
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ConfigError(f"base URI {uri!r} has no bucket; write s3://bucket/prefix")
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
    raise ConfigError(
        f"unsupported base URI scheme {parsed.scheme!r} in {uri!r}; use file:///path, a "
        "local path, or s3://bucket/prefix"
    )
