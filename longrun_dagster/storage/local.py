"""Local filesystem backend: temp file + fsync + rename + directory fsync."""

import errno
import fcntl
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from longrun_dagster.errors import CommitConflict, ObjectNotFound, StorageError
from longrun_dagster.storage.base import (
    DIGEST_ALGORITHM,
    Hasher,
    ObjectInfo,
    ObjectStore,
    PutResult,
    check_key,
    new_hasher,
)

TEMP_PREFIX = ".tmp-"
LOCK_SUFFIX = ".lock"
_CHUNK = 4 * 1024 * 1024
"""Hashed then written while still in cache: one pass over the bytes (bench/io.py)."""


def _token(st: os.stat_result) -> str:
    # A rename always brings a new inode; with mtime and size it tells versions apart.
    return f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(directory: Path) -> None:
    """Create ``directory`` and its missing parents one level at a time, each made durable
    in its parent: after a power loss a committed file's whole path is still there."""
    missing: list[Path] = []
    while not directory.is_dir():
        missing.append(directory)
        directory = directory.parent
    for new in reversed(missing):
        try:
            new.mkdir()
        except FileExistsError:
            pass  # a concurrent writer made it and may not have synced its parent yet
        _fsync_dir(new.parent)


def _is_hidden(name: str) -> bool:
    return name.startswith(TEMP_PREFIX) or name.endswith(LOCK_SUFFIX)


class LocalStore(ObjectStore):
    """Objects as files under ``root``; the embedded default backend."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()
        self.uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(
        self, key: str, data: bytes | memoryview, *, if_absent: bool = False,
        if_match: str | None = None,
    ) -> PutResult:
        path = self._path(key)
        hasher = new_hasher()
        try:
            _make_dirs(path.parent)
            tmp = path.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex}-{path.name}")
            try:  # a failed write (disk full) must not leave its partial temp file behind
                self._write_durably(tmp, data, hasher)
                token = self._publish(tmp, path, if_absent=if_absent, if_match=if_match)
            finally:
                tmp.unlink(missing_ok=True)
            _fsync_dir(path.parent)
        except OSError as exc:
            raise StorageError(
                f"could not write {self.uri_of(key)}: {exc}; check that the directory is "
                "writable and the disk has space", uri=self.uri_of(key),
            ) from exc
        return PutResult(key=key, size=len(data), digest=hasher.hexdigest(),
                         algorithm=DIGEST_ALGORITHM, token=token)

    @staticmethod
    def _write_durably(tmp: Path, data: bytes | memoryview, hasher: Hasher) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data).cast("B")
            for start in range(0, len(view), _CHUNK):
                chunk = view[start : start + _CHUNK]
                hasher.update(chunk)
                while chunk:
                    chunk = chunk[os.write(fd, chunk) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    def _publish(self, tmp: Path, path: Path, *, if_absent: bool, if_match: str | None) -> str:
        if if_absent:
            try:
                os.link(tmp, path)  # atomic, and fails if path exists: O_EXCL for a rename
            except FileExistsError as exc:
                raise CommitConflict(
                    f"{path.as_uri()} already exists; another writer committed first",
                    uri=path.as_uri(),
                ) from exc
            return _token(path.stat())
        if if_match is None:
            os.replace(tmp, path)
            return _token(path.stat())
        with self._locked(path):
            current = self._current_token(path)
            if current != if_match:
                raise CommitConflict(
                    f"{path.as_uri()} changed since it was read (token {if_match}, now "
                    f"{current}); another writer committed first", uri=path.as_uri(),
                )
            os.replace(tmp, path)
            return _token(path.stat())

    @staticmethod
    def _current_token(path: Path) -> str | None:
        try:
            return _token(path.stat())
        except FileNotFoundError:
            return None

    @staticmethod
    @contextmanager
    def _locked(path: Path) -> Iterator[None]:
        # flock is dropped by the kernel when its holder dies, so kill -9 cannot wedge it.
        fd = os.open(path.with_name(path.name + LOCK_SUFFIX), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def get(self, key: str) -> tuple[bytes, str]:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                token = _token(os.fstat(f.fileno()))
                return f.read(), token
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise ObjectNotFound(f"no object at {self.uri_of(key)}", uri=self.uri_of(key)) from exc
        except OSError as exc:
            raise StorageError(f"could not read {self.uri_of(key)}: {exc}",
                               uri=self.uri_of(key)) from exc

    def stat(self, key: str) -> ObjectInfo:
        try:
            st = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise ObjectNotFound(f"no object at {self.uri_of(key)}", uri=self.uri_of(key)) from exc
        return ObjectInfo(key=key, size=st.st_size, token=_token(st), modified=st.st_mtime)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        for path, st in self._walk(prefix):
            if not _is_hidden(path.name):
                key = path.relative_to(self.root).as_posix()
                yield ObjectInfo(key=key, size=st.st_size, token=_token(st), modified=st.st_mtime)

    def _walk(self, prefix: str) -> Iterator[tuple[Path, os.stat_result]]:
        # "a/p=1/" is a folder; "a/p=1" is a plain string prefix and matches a/p=10/ too.
        base = self.root / prefix if prefix else self.root
        start = base if prefix.endswith("/") or not prefix else base.parent
        for dirpath, _dirs, files in os.walk(start):
            for name in sorted(files):
                path = Path(dirpath) / name
                if not path.relative_to(self.root).as_posix().startswith(prefix):
                    continue
                try:
                    yield path, path.stat()
                except FileNotFoundError:
                    continue  # deleted while listing

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise StorageError(f"could not delete {self.uri_of(key)}: {exc}",
                                   uri=self.uri_of(key)) from exc

    def clean_incomplete(self, prefix: str, older_than_s: float, *,
                         at_once_under: str | None = None) -> int:
        cutoff = time.time() - older_than_s
        removed = 0
        for path, st in self._walk(prefix):
            at_once = at_once_under is not None and \
                path.relative_to(self.root).as_posix().startswith(at_once_under)
            if path.name.startswith(TEMP_PREFIX) and (at_once or st.st_mtime < cutoff):
                path.unlink(missing_ok=True)
                removed += 1
        return removed
