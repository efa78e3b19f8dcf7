"""One partition attempt (begin -> reusable -> claim -> checkpointer -> commit) on both
backends: fencing without a window, GC counted from replacement, versioned manifests."""

import json
import time
from pathlib import Path

import pandas as pd
import pytest

from longrun_dagster import AtomicObjectStoreIOManager, formats, garbage_collection_job
from longrun_dagster.attempt import Claimed, Committed, Reused
from longrun_dagster.commit import MANIFEST, PartitionStore
from longrun_dagster.errors import (
    CommitConflict,
    CorruptObject,
    LeaseLost,
    NewerFormat,
    PartitionNotCommitted,
)
from longrun_dagster.storage import LocalStore, ObjectStore

A = ["stage", "scores"]
P = "2024-01-01"


def payload(text: str) -> dict[str, tuple[bytes, str]]:
    return {"data": (text.encode(), "bin")}


def test_gc_keeps_a_replaced_version_for_the_grace_counted_from_its_replacement(
        store: ObjectStore) -> None:
    """GC counted an object's age from its write, so the post-commit GC deleted a previous
    version older than gc_grace_seconds at once, and a reader that had just looked it up
    got ``CorruptObject ... missing``."""
    parts = PartitionStore(store, gc_grace_seconds=1.0)
    parts.commit(A, P, payload("v1"), format="bytes", rows=None, run_id="r1")
    time.sleep(1.3)  # v1's objects are now older than the grace
    looked_up = parts.lookup(A, P)  # a reader looks v1 up ...
    assert looked_up is not None
    parts.commit(A, P, payload("v2"), format="bytes", rows=None, run_id="r2")  # ... v2 lands
    assert parts.read_object(A, P, looked_up.objects[0]) == b"v1"  # ... and reads v1 whole
    time.sleep(1.3)
    report = parts.collect_garbage(A)
    assert report.objects_removed == 1
    assert parts.read(A, P)[1] == b"v2"


def test_a_superseded_attempt_cannot_commit_and_the_winner_does(store: ObjectStore) -> None:
    """The lease was checked, then the manifest PUT was conditioned only on the token seen at
    start: a zombie that passed the check committed after B took the next generation, and B
    failed with CommitConflict after its full compute."""
    parts = PartitionStore(store)
    zombie = parts.begin(A, P, run_id="zombie", fingerprint="f")
    assert isinstance(zombie.claim(), Claimed)
    winner = parts.begin(A, P, run_id="winner", fingerprint="f")
    claimed = winner.claim()
    assert isinstance(claimed, Claimed) and claimed.claim.generation == 2
    with pytest.raises(LeaseLost, match="run winner took generation 2"):
        zombie.commit_objects(payload("zombie"), format="bytes", rows=None)
    result = winner.commit_objects(payload("winner"), format="bytes", rows=None)
    assert isinstance(result, Committed) and result.manifest.generation == 2
    assert parts.read(A, P)[1] == b"winner"
    with pytest.raises(LeaseLost):  # a zombie waking up after the commit is refused too
        zombie.commit_objects(payload("zombie"), format="bytes", rows=None)
    assert parts.read(A, P)[1] == b"winner"


def test_a_deleted_claim_fails_the_attempt_naming_it_and_never_lets_a_zombie_through(
        store: ObjectStore) -> None:
    """Deleting the lease reset the generation, so an old zombie passed again, and a fresh
    attempt failed with a bare ObjectNotFound."""
    parts = PartitionStore(store)
    zombie = parts.begin(A, P, run_id="zombie", fingerprint="f")
    zombie.claim()
    store.delete(parts.prefix(A, P) + MANIFEST)
    with pytest.raises(LeaseLost, match=r"was deleted while run zombie computed it.*"
                                        r"Re-materialize the partition"):
        zombie.commit_objects(payload("zombie"), format="bytes", rows=None)
    fresh = parts.begin(A, P, run_id="fresh", fingerprint="f")
    assert isinstance(fresh.claim(), Claimed)
    with pytest.raises(LeaseLost):
        zombie.commit_objects(payload("zombie"), format="bytes", rows=None)
    assert isinstance(fresh.commit_objects(payload("fresh"), format="bytes", rows=None),
                      Committed)
    assert parts.read(A, P)[1] == b"fresh"


def test_a_damaged_claim_is_never_overwritten_and_names_itself_and_the_fix(
        store: ObjectStore) -> None:
    """A damaged lease reset (or blocked) the generation with no word of what to do."""
    parts = PartitionStore(store)
    parts.commit(A, P, payload("v1"), format="bytes", rows=None, run_id="r1", fingerprint="f")
    running = parts.begin(A, P, run_id="running", fingerprint="g")
    running.claim()
    key = parts.prefix(A, P) + MANIFEST
    raw = store.get(key)[0]
    store.put(key, raw.replace(b'"generation": 2', b'"generation": 9'))
    uri = store.uri_of(key)
    with pytest.raises(LeaseLost, match=r"fails its own checksum.*delete it \(" + uri):
        running.commit_objects(payload("v2"), format="bytes", rows=None)
    fresh = parts.begin(A, P, run_id="fresh", fingerprint="g")
    with pytest.raises(CorruptObject, match=r"manifest and claim are damaged.*Nothing was "
                                            r"overwritten.*delete it \(" + uri):
        fresh.claim()
    assert store.get(key)[0] != raw and b'"generation": 9' in store.get(key)[0]


def test_a_winner_that_finds_its_fingerprint_committed_reports_reuse(store: ObjectStore
                                                                     ) -> None:
    """Two attempts with the same inputs: the second one to claim finds the first one's
    commit and reuses it instead of failing with CommitConflict."""
    parts = PartitionStore(store)
    first = parts.begin(A, P, run_id="first", fingerprint="f")
    second = parts.begin(A, P, run_id="second", fingerprint="f")
    first.claim()
    first.commit_objects(payload("out"), format="bytes", rows=None)
    result = second.claim()
    assert isinstance(result, Reused) and result.manifest.run_id == "first"


def test_a_zombie_never_prunes_or_overwrites_the_live_attempts_checkpoints(
        store: ObjectStore) -> None:
    """A zombie wrote cursors with the same names as the live attempt's and pruned every
    object its own cursors did not name, including the live attempt's fresh shards."""
    parts = PartitionStore(store)
    zombie = parts.begin(A, P, run_id="zombie", fingerprint="f")
    zombie.claim()
    zombie_ckpt = zombie.checkpointer(background=False)
    zombie_ckpt.save(1, new_shards=[("valid", b"z1")])
    live = parts.begin(A, P, run_id="live", fingerprint="f")
    live.claim()
    live_ckpt = live.checkpointer(background=False)
    restored = live_ckpt.restore()
    assert restored is not None and restored.step == 1
    live_ckpt.save(2, new_shards=[("valid", b"l2")])
    for step in range(2, 8):  # the zombie wakes up and keeps saving (and pruning)
        zombie_ckpt.save(step, new_shards=[("valid", f"z{step}".encode())])
    live_cursor = live_ckpt._cursor_key(2)
    mine = live_ckpt._load(live_cursor, [])  # verifies every object it names
    assert [data for _, data in mine.shards] == [b"z1", b"l2"]
    assert mine.step == 2 and live_ckpt._read_cursor(live_cursor).run_id == "live"


def test_a_newer_manifest_is_reported_as_newer_and_never_overwritten(store: ObjectStore
                                                                     ) -> None:
    """The manifest version was never checked: a manifest from a newer library was
    reported as damaged and overwritten by the next commit."""
    parts = PartitionStore(store)
    key = parts.prefix(A, P) + MANIFEST
    body = {"version": 99, "asset": A, "partition": P, "whatever": "new"}
    from longrun_dagster.manifest import _checksum

    body["checksum"] = _checksum(body)
    raw = json.dumps(body).encode()
    store.put(key, raw)
    with pytest.raises(NewerFormat, match="newer longrun-dagster.*upgrade"):
        parts.lookup(A, P)
    with pytest.raises(NewerFormat):
        parts.begin(A, P, run_id="r", fingerprint="f")
    assert parts.collect_garbage(A, older_than_s=0).objects_removed == 0
    assert store.get(key)[0] == raw


def test_a_version_1_manifest_still_reads_verifies_and_is_replaced(store: ObjectStore
                                                                   ) -> None:
    """Partitions committed by 0.1 (bare manifest, format 1) stay readable and reusable."""
    import hashlib

    parts = PartitionStore(store)
    prefix = parts.prefix(A, P)
    data = b"old bytes"
    store.put(prefix + "data-old-1.bin", data)
    body = {"asset": A, "partition": P, "format": "bytes", "rows": None, "fingerprint": "f",
            "run_id": "old", "created_at": "2026-01-01T00:00:00.000+00:00", "metadata": {},
            "generation": 4, "objects": [{"role": "data", "name": "data-old-1.bin",
                                          "size": len(data),
                                          "sha256": hashlib.sha256(data).hexdigest()}],
            "version": 1}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    body["checksum"] = hashlib.sha256(canonical).hexdigest()
    store.put(prefix + MANIFEST, json.dumps(body, sort_keys=True, indent=1).encode())
    assert parts.read(A, P)[1] == data
    attempt = parts.begin(A, P, run_id="new", fingerprint="f")
    assert attempt.reusable() is not None
    newer = parts.begin(A, P, run_id="new", fingerprint="g")
    claimed = newer.claim()
    assert isinstance(claimed, Claimed) and claimed.claim.generation == 5
    newer.commit_objects(payload("new"), format="bytes", rows=None)
    assert parts.read(A, P)[1] == b"new"


def test_damaged_bytes_are_never_decoded(store: ObjectStore,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Damaged bytes were handed to the Arrow decoder before the digest was compared: hostile
    bytes could crash the process or allocate without bound instead of ``CorruptObject``."""
    parts = PartitionStore(store)
    manifest = parts.begin(A, P, run_id="r").commit(pd.DataFrame({"x": range(100)})).manifest
    stored = manifest.object()
    assert stored is not None
    key = parts.prefix(A, P) + stored.name
    raw = bytearray(store.get(key)[0])
    raw[len(raw) // 2] ^= 0xFF
    store.put(key, bytes(raw))
    decoded: list[str] = []
    real = formats.decode
    monkeypatch.setattr(formats, "decode",
                        lambda fmt, data: decoded.append(fmt) or real(fmt, data))
    with pytest.raises(CorruptObject, match="fails its blake3 check"):
        parts.load(A, P)
    assert decoded == []


def test_an_unclaimed_commit_conflict_keeps_the_first(store: ObjectStore) -> None:
    parts = PartitionStore(store)
    with pytest.raises(PartitionNotCommitted):
        parts.read(A, P)
    one = parts.begin(A, P, run_id="one")
    two = parts.begin(A, P, run_id="two")
    one.commit_objects(payload("one"), format="bytes", rows=None)
    with pytest.raises(CommitConflict):
        two.commit_objects(payload("two"), format="bytes", rows=None)
    assert parts.read(A, P)[1] == b"one"


def test_temp_files_left_by_a_hard_exit_are_collected(tmp_path: Path) -> None:
    """``.tmp-`` files left by a hard exit (kill -9 mid-write) were never cleaned: the
    post-commit GC of the retry ran inside the grace period, checkpoint clearing skipped
    them, and nothing swept later. A commit now drops its checkpoint folder's leftovers at
    once, and the garbage-collection job sweeps the rest once past the grace."""
    store = LocalStore(tmp_path)
    parts = PartitionStore(store, gc_grace_seconds=1.0)
    attempt = parts.begin(A, P, run_id="r", fingerprint="f")
    attempt.claim()
    ckpt = attempt.checkpointer(background=False)
    ckpt.save(1, new_shards=[("valid", b"s")])
    folder = tmp_path / ckpt.own
    (folder / ".tmp-dead-shard.parquet").write_bytes(b"torn")  # what kill -9 leaves
    partition = tmp_path / parts.prefix(A, P)
    (partition / ".tmp-dead-data.bin").write_bytes(b"torn")
    attempt.commit_objects(payload("v"), format="bytes", rows=None)
    assert not list((tmp_path / parts.prefix(A, P) / "_checkpoints").rglob(".tmp-*"))
    time.sleep(1.2)
    job = garbage_collection_job()
    result = job.execute_in_process(
        resources={"io_manager": AtomicObjectStoreIOManager(base_uri=tmp_path.as_uri(),
                                                            gc_grace_seconds=1.0)})
    assert result.success
    assert not list(tmp_path.rglob(".tmp-*"))
    assert parts.read(A, P)[1] == b"v"


def test_a_commit_collects_versions_retired_longer_than_the_grace_and_keeps_the_rest(
        store: ObjectStore) -> None:
    """Counting from the replacement must not mean never: a commit deletes the objects of a
    version replaced more than the grace ago, and keeps the one it just replaced."""
    parts = PartitionStore(store, gc_grace_seconds=1.0)
    v1 = parts.commit(A, P, payload("v1"), format="bytes", rows=None, run_id="r1")
    v2 = parts.commit(A, P, payload("v2"), format="bytes", rows=None, run_id="r2")
    time.sleep(1.3)
    parts.commit(A, P, payload("v3"), format="bytes", rows=None, run_id="r3")
    names = {i.key.rpartition("/")[2] for i in store.list(parts.prefix(A, P))}
    assert v1.objects[0].name not in names and v2.objects[0].name in names
    assert parts.read_object(A, P, v2.objects[0]) == b"v2"
