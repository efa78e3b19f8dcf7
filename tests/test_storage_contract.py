"""One contract for every object store backend (local filesystem, S3 over loopback HTTP)."""

import os
import threading
from pathlib import Path

import blake3
import pytest

from longrun_dagster.errors import CommitConflict, ConfigError, ObjectNotFound
from longrun_dagster.storage import LocalStore, ObjectStore, S3Store
from longrun_dagster.storage import local as local_module
from tests.conftest import s3_client


def test_put_get_roundtrip_with_size_token_and_blake3(store: ObjectStore) -> None:
    put = store.put("a/b/obj.bin", b"hello")
    data, token = store.get("a/b/obj.bin")
    assert data == b"hello"
    assert put.size == 5 and put.token == token == store.stat("a/b/obj.bin").token
    assert put.algorithm == "blake3"
    assert put.digest == "ea8f163db38682925e4491c5e58d4bb3506ef8c14eb78a86e908c5624a67200f"
    assert store.exists("a/b/obj.bin") and not store.exists("a/b/other")


def test_digest_covers_every_chunk_of_a_large_object(store: ObjectStore) -> None:
    """The digest is computed chunk by chunk as the bytes are written: a chunking bug would
    checksum only part of the object. Multipart on S3, several write chunks locally."""
    data = os.urandom(9 * 1024 * 1024 + 7)
    put = store.put("big.bin", memoryview(data))
    assert put.digest == blake3.blake3(data).hexdigest() and put.size == len(data)
    assert store.get("big.bin")[0] == data


def test_missing_object_is_a_file_not_found_error_naming_the_uri(store: ObjectStore) -> None:
    with pytest.raises(FileNotFoundError) as info:
        store.get("nope/missing.bin")
    assert isinstance(info.value, ObjectNotFound)
    assert "nope/missing.bin" in str(info.value) and store.uri in str(info.value)
    with pytest.raises(ObjectNotFound):
        store.stat("nope/missing.bin")


def test_if_absent_refuses_the_second_writer_and_keeps_the_first(store: ObjectStore) -> None:
    store.put("m.json", b"first", if_absent=True)
    with pytest.raises(CommitConflict):
        store.put("m.json", b"second", if_absent=True)
    assert store.get("m.json")[0] == b"first"


def test_if_match_needs_the_current_token(store: ObjectStore) -> None:
    first = store.put("m.json", b"v1")
    second = store.put("m.json", b"v2", if_match=first.token)
    assert second.token != first.token
    with pytest.raises(CommitConflict):
        store.put("m.json", b"v3", if_match=first.token)  # stale token
    assert store.get("m.json")[0] == b"v2"
    with pytest.raises(CommitConflict):
        store.put("absent.json", b"x", if_match=first.token)


def test_list_is_prefix_scoped_and_shows_no_temporaries(store: ObjectStore) -> None:
    for key in ("p/one", "p/two", "p/sub/three", "q/four"):
        store.put(key, key.encode())
    keys = sorted(info.key for info in store.list("p/"))
    assert keys == ["p/one", "p/sub/three", "p/two"]
    assert {info.size for info in store.list("q/")} == {6}


def test_delete_is_idempotent(store: ObjectStore) -> None:
    store.put("d/x", b"1")
    store.delete("d/x")
    store.delete("d/x")
    assert not store.exists("d/x")


def test_large_object_roundtrip(store: ObjectStore) -> None:
    """Above the multipart threshold on S3 (parts uploaded concurrently)."""
    payload = os.urandom(13 * 1024 * 1024)
    put = store.put("big/blob", payload)
    assert store.get("big/blob")[0] == payload
    assert put.size == len(payload)


def test_reader_never_sees_a_partial_object(store: ObjectStore) -> None:
    """Overwrites of a large object race a reader: every read is one whole version."""
    versions = [bytes([i]) * (7 * 1024 * 1024) for i in range(4)]
    store.put("race/obj", versions[0])
    seen: list[bytes] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            seen.append(store.get("race/obj")[0])

    thread = threading.Thread(target=reader)
    thread.start()
    for version in versions[1:] * 2:
        store.put("race/obj", version)
    stop.set()
    thread.join()
    assert seen and all(data in versions for data in seen)


def test_failed_conditional_write_leaves_previous_version_intact(store: ObjectStore) -> None:
    good = store.put("v/manifest", b"good")
    with pytest.raises(CommitConflict):
        store.put("v/manifest", os.urandom(7 * 1024 * 1024), if_match="stale-token")
    assert store.get("v/manifest") == (b"good", good.token)
    assert [i.key for i in store.list("v/")] == ["v/manifest"]


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "..", "a//b", "a\\b", "a\x00b", "./a"])
def test_unsafe_keys_are_refused(store: ObjectStore, key: str) -> None:
    with pytest.raises(ConfigError, match="unsafe object key"):
        store.put(key, b"x")


def test_clean_incomplete_removes_only_old_leftovers(store: ObjectStore) -> None:
    store.put("c/keep", b"1")
    leftovers = _leave_incomplete_write(store, "c/torn")
    if isinstance(store, LocalStore):  # moto dates every multipart upload 2010-11-10
        assert store.clean_incomplete("c/", older_than_s=3600) == 0
    assert store.clean_incomplete("c/", older_than_s=0) == leftovers
    assert [i.key for i in store.list("c/")] == ["c/keep"]


def test_list_stops_at_the_folder_boundary(store: ObjectStore) -> None:
    """Listing partition folder a/p=1/ must not return partition a/p=10/'s objects."""
    store.put("a/p=10/data", b"10")
    assert list(store.list("a/p=1/")) == []
    store.put("a/p=1/data", b"1")
    assert [i.key for i in store.list("a/p=1/")] == ["a/p=1/data"]


def test_list_without_a_slash_matches_keys_by_plain_prefix(store: ObjectStore) -> None:
    """LocalStore.list("a/p=1") walked only folder a/p=1 when it existed and missed
    a/p=10/, where S3 (and the contract) match every key starting with the prefix."""
    for key in ("a/p=1/data", "a/p=10/data", "a/q/data"):
        store.put(key, b"x")
    assert sorted(i.key for i in store.list("a/p=1")) == ["a/p=1/data", "a/p=10/data"]


def test_clean_incomplete_stops_at_the_folder_boundary(store: ObjectStore) -> None:
    """clean_incomplete("a/p=1/", ...) stripped the trailing slash on S3, so cleaning
    partition folder a/p=1/ aborted the unfinished multipart uploads of a/p=10/ too."""
    _leave_incomplete_write(store, "a/p=1/x")
    _leave_incomplete_write(store, "a/p=10/x")
    assert store.clean_incomplete("a/p=1/", older_than_s=0) == 1
    assert _incomplete_writes(store, "a/") == ["a/p=10/x"]


@pytest.mark.s3
def test_clean_incomplete_of_a_whole_store_leaves_its_neighbour_alone(
    s3_endpoint: str, s3_bucket: str
) -> None:
    """clean_incomplete("") on store s3://bucket/prefix/x matched "prefix/x" without its
    slash and aborted the unfinished uploads of store s3://bucket/prefix/xy too."""
    client = s3_client(s3_endpoint)
    store, neighbour = (S3Store(client, s3_bucket, p) for p in ("prefix/x", "prefix/xy"))
    _leave_incomplete_write(store, "obj")
    _leave_incomplete_write(neighbour, "obj")
    assert store.clean_incomplete("", older_than_s=0) == 1
    assert _incomplete_writes(neighbour, "") == ["obj"]


def test_local_put_makes_every_new_directory_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """put() made missing directories with mkdir(parents=True) and fsynced only the leaf
    folder, so a power loss could drop a new directory's entry in its parent and with it
    a committed file."""
    synced: list[Path] = []
    real_fsync_dir = local_module._fsync_dir

    def recording_fsync_dir(path: Path) -> None:
        synced.append(Path(path))
        real_fsync_dir(path)

    monkeypatch.setattr(local_module, "_fsync_dir", recording_fsync_dir)
    store = LocalStore(tmp_path / "store")
    store.put("a/b/c/obj", b"x")
    root = store.root
    assert {root, root / "a", root / "a/b", root / "a/b/c"} <= set(synced)


def _leave_incomplete_write(store: ObjectStore, key: str) -> int:
    """What a writer killed mid-write leaves behind, made the way the backend makes it."""
    if isinstance(store, LocalStore):
        path = store.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / f".tmp-deadbeef-{path.name}").write_bytes(b"partial")
        return 1
    assert isinstance(store, S3Store)
    store.client.create_multipart_upload(Bucket=store.bucket, Key=store._key(key))
    return 1


def _incomplete_writes(store: ObjectStore, prefix: str) -> list[str]:
    """Keys of the unfinished writes under ``prefix``, as ``_leave_incomplete_write`` names them."""
    if isinstance(store, LocalStore):
        return sorted(
            (p.parent / p.name.removeprefix(".tmp-deadbeef-")).relative_to(store.root).as_posix()
            for p in (store.root / prefix).rglob(".tmp-*")
        )
    assert isinstance(store, S3Store)
    uploads = store.client.list_multipart_uploads(Bucket=store.bucket,
                                                  Prefix=store._full_prefix(prefix))
    return sorted(store._relative(u["Key"]) for u in uploads.get("Uploads", []))
