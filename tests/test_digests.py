"""Object digests: BLAKE3 for new objects, and SHA-256 objects of older manifests still
verify (the algorithm is recorded per object)."""

import hashlib
from pathlib import Path

import blake3
import pandas as pd
import pytest

from longrun_dagster import manifest
from longrun_dagster.commit import PartitionStore
from longrun_dagster.errors import ConfigError, CorruptObject
from longrun_dagster.manifest import Manifest, StoredObject
from longrun_dagster.storage import ObjectStore
from longrun_dagster.verify import read_verified

A = ["stage", "scores"]
P = "2024-01-01"
DIGESTS = {"sha256": lambda b: hashlib.sha256(b).hexdigest(),
           "blake3": lambda b: blake3.blake3(b).hexdigest()}


def flip_a_bit(store: ObjectStore, key: str) -> None:
    raw = bytearray(store.get(key)[0])
    raw[len(raw) // 2] ^= 0x01
    store.put(key, bytes(raw))


@pytest.mark.parametrize("algorithm", list(DIGESTS))
def test_each_algorithm_verifies_and_catches_a_bit_flip(store: ObjectStore,
                                                        algorithm: str) -> None:
    data = b"committed bytes " * 1000
    store.put("obj.bin", data)
    stored = StoredObject(role="data", name="obj.bin", size=len(data),
                          digest=DIGESTS[algorithm](data), algorithm=algorithm)
    assert read_verified(store, "obj.bin", stored, owner="test", fix="redo") == data
    flip_a_bit(store, "obj.bin")
    with pytest.raises(CorruptObject, match=f"fails its {algorithm} check"):
        read_verified(store, "obj.bin", stored, owner="test", fix="redo")


def test_a_new_commit_records_blake3(store: ObjectStore) -> None:
    parts = PartitionStore(store)
    committed = parts.begin(A, P, run_id="r").commit(pd.DataFrame({"x": [1.0, 2.0]})).manifest
    stored = committed.object()
    assert stored is not None and stored.algorithm == "blake3"
    got, data = parts.read(A, P)
    assert stored.digest == blake3.blake3(data).hexdigest() and got == committed
    with pytest.raises(ValueError, match="records a blake3 digest"):
        _ = stored.sha256


def test_a_partition_committed_with_sha256_still_reads(store: ObjectStore) -> None:
    """Manifests written before 0.2 name sha256 digests: they must read, not be recomputed."""
    parts = PartitionStore(store)
    payload = b'{"rows": [1, 2, 3]}'
    store.put(parts.prefix(A, P) + "data-old.json", payload)
    old = Manifest(asset=A, partition=P, format="json", rows=3, fingerprint=None,
                   run_id="old", created_at="2026-01-01T00:00:00+00:00", generation=1,
                   objects=[StoredObject(role="data", name="data-old.json", size=len(payload),
                                         digest=hashlib.sha256(payload).hexdigest())])
    store.put(parts.prefix(A, P) + "_manifest.json", manifest.encode(A, P, old, None))
    got, data = parts.read(A, P)
    assert data == payload and got.objects[0].algorithm == "sha256"
    assert got.objects[0].sha256 == got.objects[0].digest
    flip_a_bit(store, parts.prefix(A, P) + "data-old.json")
    with pytest.raises(CorruptObject, match="fails its sha256 check"):
        parts.read(A, P)


def test_an_unknown_algorithm_asks_for_an_upgrade(tmp_path: Path) -> None:
    from longrun_dagster.storage import LocalStore

    store = LocalStore(tmp_path)
    store.put("obj.bin", b"x")
    stored = StoredObject(role="data", name="obj.bin", size=1, digest="00", algorithm="k12")
    with pytest.raises(ConfigError, match="upgrade longrun-dagster"):
        read_verified(store, "obj.bin", stored, owner="test", fix="redo")
