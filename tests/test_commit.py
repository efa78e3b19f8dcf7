"""The commit protocol on both backends: manifests last, verified reads, conflicts, GC."""

import json
import time

import pytest

from longrun_dagster.commit import MANIFEST, PartitionStore
from longrun_dagster.errors import CommitConflict, CorruptObject, PartitionNotCommitted
from longrun_dagster.storage import ObjectStore

A = ["stage", "scores"]


def commit(parts: PartitionStore, payload: bytes, run: str = "run1", **kw: object) -> object:
    return parts.commit(A, "2024-01-01", {"data": (payload, "bin")}, format="json", rows=3,
                        run_id=run, **kw)  # type: ignore[arg-type]


def test_commit_then_read_verified(store: ObjectStore) -> None:
    parts = PartitionStore(store)
    assert parts.lookup(A, "2024-01-01") is None
    manifest = commit(parts, b"[1,2,3]", fingerprint="f1")
    got, data = parts.read(A, "2024-01-01")
    assert data == b"[1,2,3]" and got == manifest
    assert got.rows == 3 and got.run_id == "run1" and got.token
    assert parts.committed_with(A, "2024-01-01", "f1") == manifest
    assert parts.committed_with(A, "2024-01-01", "f2") is None


def test_uncommitted_partition_names_asset_partition_and_fix(store: ObjectStore) -> None:
    with pytest.raises(PartitionNotCommitted, match=r"'2024-01-02' of asset stage/scores.*"
                       r"materialize it first") as info:
        PartitionStore(store).read(A, "2024-01-02")
    assert isinstance(info.value, FileNotFoundError)


def test_data_without_manifest_is_never_read(store: ObjectStore) -> None:
    """A writer that died between data and manifest left an orphan: readers ignore it."""
    parts = PartitionStore(store)
    commit(parts, b"old")
    store.put(parts.prefix(A, "2024-01-01") + "data-dead-123.bin", b"new-orphan")
    assert parts.read(A, "2024-01-01")[1] == b"old"


def test_conflicting_commit_is_refused_and_first_stays(store: ObjectStore) -> None:
    parts = PartitionStore(store)
    a = parts.begin(A, "2024-01-01", run_id="a")  # both attempts start on an empty partition
    b = parts.begin(A, "2024-01-01", run_id="b")
    a.commit_objects({"data": (b"winner", "bin")}, format="json", rows=None)
    with pytest.raises(CommitConflict, match="was committed by run a while run b"):
        b.commit_objects({"data": (b"loser", "bin")}, format="json", rows=None)
    assert parts.read(A, "2024-01-01")[1] == b"winner"


def test_recommit_replaces_atomically(store: ObjectStore) -> None:
    parts = PartitionStore(store)
    commit(parts, b"v1")
    commit(parts, b"v2", run="run2")
    manifest, data = parts.read(A, "2024-01-01")
    assert data == b"v2" and manifest.run_id == "run2"


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "delete"])
def test_damaged_data_object_is_detected_naming_it(store: ObjectStore, damage: str) -> None:
    parts = PartitionStore(store)
    manifest = commit(parts, b"0123456789" * 100)
    key = parts.prefix(A, "2024-01-01") + manifest.object().name  # type: ignore[attr-defined]
    raw = store.get(key)[0]
    if damage == "truncate":
        store.put(key, raw[:-7])
    elif damage == "bitflip":
        store.put(key, raw[:500] + bytes([raw[500] ^ 0x01]) + raw[501:])
    else:
        store.delete(key)
    with pytest.raises(CorruptObject) as info:
        parts.read(A, "2024-01-01")
    assert store.uri_of(key) in str(info.value) and "re-materialize" in str(info.value)


def test_bitflipped_manifest_is_detected(store: ObjectStore) -> None:
    parts = PartitionStore(store)
    commit(parts, b"x")
    key = parts.prefix(A, "2024-01-01") + MANIFEST
    body = json.loads(store.get(key)[0])
    body["commit"]["rows"] = 4  # valid JSON, wrong content
    store.put(key, json.dumps(body).encode())
    with pytest.raises(CorruptObject, match="fails its own checksum"):
        parts.lookup(A, "2024-01-01")


def test_gc_removes_only_old_unreferenced_objects(store: ObjectStore) -> None:
    parts = PartitionStore(store)
    first = commit(parts, b"v1")
    commit(parts, b"v2", run="run2")
    prefix = parts.prefix(A, "2024-01-01")
    store.put(prefix + "data-orphan-1.bin", b"orphan")
    store.put(prefix + "_checkpoints/cursor-1.json", b"{}")  # owned by the checkpointer
    assert parts.collect_garbage(A, older_than_s=3600).objects_removed == 0
    time.sleep(1.1)
    report = parts.collect_garbage(A, older_than_s=1)
    names = {i.key.rsplit("/", 1)[1] for i in store.list(prefix)}
    assert report.objects_removed == 2  # v1's data and the orphan
    assert first.object().name not in names  # type: ignore[attr-defined]
    assert "data-orphan-1.bin" not in names and "cursor-1.json" in names
    assert parts.read(A, "2024-01-01")[1] == b"v2"
