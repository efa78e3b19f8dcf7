"""S3 backend: single or multipart PUT (aborted on failure), conditional manifest PUTs."""

import io
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn

from botocore.exceptions import BotoCoreError, ClientError

from longrun_dagster.errors import CommitConflict, ObjectNotFound, StorageError
from longrun_dagster.storage.base import (
    DIGEST_ALGORITHM,
    ObjectInfo,
    ObjectStore,
    PutResult,
    check_key,
    new_hasher,
)

_CONFLICT_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


class _ViewReader(io.RawIOBase):
    """A seekable file over a memoryview: botocore takes no memoryview as a Body, and
    ``bytes(view)`` or ``io.BytesIO(view)`` would copy every part once more."""

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._at = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._at

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._at, io.SEEK_END: len(self._view)}[whence]
        self._at = base + offset
        return self._at

    def readinto(self, buffer: "memoryview | bytearray") -> int:  # type: ignore[override]
        n = max(0, min(len(buffer), len(self._view) - self._at))
        buffer[:n] = self._view[self._at : self._at + n]
        self._at += n
        return n


def _raise_translated(
    exc: Exception, uri: str, action: str, *, conditional: bool = False
) -> NoReturn:
    """The one seam where boto errors become ours."""
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        # If-Match on a key that is gone answers 404: for a conditional write, a conflict.
        if code in _CONFLICT_CODES or (conditional and code in _MISSING_CODES):
            raise CommitConflict(
                f"{uri} changed since it was read ({code}); another writer committed first",
                uri=uri,
            ) from exc
        if code in _MISSING_CODES:
            raise ObjectNotFound(f"no object at {uri}", uri=uri) from exc
        if code == "NoSuchBucket":
            raise StorageError(
                f"bucket of {uri} does not exist; create it or fix the base URI", uri=uri
            ) from exc
    raise StorageError(
        f"could not {action} {uri}: {exc}; check the S3 endpoint, credentials and bucket "
        "(S3Resource settings); transient errors are retried by botocore per its "
        "max_attempts", uri=uri,
    ) from exc


class S3Store(ObjectStore):
    """Objects under ``s3://bucket/prefix`` through a boto3 S3 client."""

    def __init__(
        self, client: Any, bucket: str, prefix: str = "", *,
        multipart_threshold: int = 64 * 1024 * 1024, part_size: int = 16 * 1024 * 1024,
        max_concurrency: int = 8,
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self.max_concurrency = max_concurrency

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _full_prefix(self, prefix: str) -> str:
        # Keep the trailing '/': without it "a/p=1" also matches "a/p=10/...".
        if not prefix:
            return self.prefix + "/" if self.prefix else ""
        return self._key(prefix.rstrip("/")) + ("/" if prefix.endswith("/") else "")

    def _where(self, prefix: str) -> str:
        return f"{self.uri}/{prefix}" if prefix else self.uri

    def _relative(self, full_key: str) -> str:
        return full_key[len(self.prefix) + 1 :] if self.prefix else full_key

    def put(
        self, key: str, data: bytes | memoryview, *, if_absent: bool = False,
        if_match: str | None = None,
    ) -> PutResult:
        conditions: dict[str, str] = {}
        if if_absent:
            conditions["IfNoneMatch"] = "*"
        if if_match is not None:
            conditions["IfMatch"] = if_match
        view = memoryview(data).cast("B")
        hasher = new_hasher()
        try:
            # Conditions go on a single PUT only: not every S3-compatible store (moto among
            # them) enforces them on CompleteMultipartUpload. Manifests are small.
            if len(view) <= self.multipart_threshold or conditions:
                hasher.update(view)
                resp = self.client.put_object(
                    Bucket=self.bucket, Key=self._key(key), Body=_ViewReader(view), **conditions
                )
            else:
                resp = self._put_multipart(self._key(key), view, hash_meanwhile=hasher.update)
        except (ClientError, BotoCoreError) as exc:
            _raise_translated(exc, self.uri_of(key), "write", conditional=bool(conditions))
        return PutResult(key=key, size=len(view), digest=hasher.hexdigest(),
                         algorithm=DIGEST_ALGORITHM, token=resp["ETag"])

    def _put_multipart(self, full_key: str, view: memoryview, *,
                       hash_meanwhile: Callable[[memoryview], object]) -> Any:
        upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=full_key)[
            "UploadId"
        ]
        try:
            offsets = range(0, len(view), self.part_size)

            def upload(number_offset: tuple[int, int]) -> dict[str, Any]:
                number, offset = number_offset
                resp = self.client.upload_part(
                    Bucket=self.bucket, Key=full_key, UploadId=upload_id, PartNumber=number,
                    Body=_ViewReader(view[offset : offset + self.part_size]),
                )
                return {"PartNumber": number, "ETag": resp["ETag"]}

            with ThreadPoolExecutor(self.max_concurrency) as pool:
                pending = pool.map(upload, enumerate(offsets, start=1))
                hash_meanwhile(view)  # the parts go out while this thread hashes
                parts = list(pending)
            return self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=full_key, UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            # Unfinished uploads are invisible but billed; never leave one behind.
            try:
                self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=full_key, UploadId=upload_id
                )
            except (ClientError, BotoCoreError):
                pass  # clean_incomplete() sweeps what an unreachable endpoint left
            raise

    def get(self, key: str) -> tuple[bytes, str]:
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return resp["Body"].read(), str(resp["ETag"])
        except (ClientError, BotoCoreError) as exc:
            _raise_translated(exc, self.uri_of(key), "read")

    def stat(self, key: str) -> ObjectInfo:
        try:
            resp = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except (ClientError, BotoCoreError) as exc:
            _raise_translated(exc, self.uri_of(key), "stat")
        return ObjectInfo(
            key=key, size=int(resp["ContentLength"]), token=str(resp["ETag"]),
            modified=resp["LastModified"].timestamp(),
        )

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._full_prefix(prefix)
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    yield ObjectInfo(
                        key=self._relative(obj["Key"]), size=int(obj["Size"]),
                        token=str(obj["ETag"]), modified=obj["LastModified"].timestamp(),
                    )
        except (ClientError, BotoCoreError) as exc:
            _raise_translated(exc, self._where(prefix), "list")

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except (ClientError, BotoCoreError) as exc:
            _raise_translated(exc, self.uri_of(key), "delete")

    def clean_incomplete(self, prefix: str, older_than_s: float, *,
                         at_once_under: str | None = None) -> int:
        cutoff = time.time() - older_than_s
        at_once = self._full_prefix(at_once_under) if at_once_under is not None else None
        removed = 0
        try:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=self._full_prefix(prefix)
            )
            for page in pages:
                for up in page.get("Uploads", []):
                    if up["Initiated"].timestamp() < cutoff or \
                            (at_once is not None and up["Key"].startswith(at_once)):
                        self.client.abort_multipart_upload(
                            Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"]
                        )
                        removed += 1
        except (ClientError, BotoCoreError) as exc:
            _raise_translated(exc, self._where(prefix), "clean up")
        return removed
