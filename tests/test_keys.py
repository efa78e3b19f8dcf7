"""Partition keys from users can never escape their folder or collide."""

from pathlib import Path

import pytest

from longrun_dagster.commit import PartitionStore
from longrun_dagster.storage import LocalStore, ObjectStore
from longrun_dagster.storage.keys import encode_component, partition_prefix

HOSTILE = [
    "..", ".", "../../etc/passwd", "a/b", "/abs", "a\\b", "nul\x00byte", "bell\x07\n\r\t",
    "k" * 1000, "k" * 999 + "j", "日本語-ключ-🚀", "", " ", "%2F", "p=1", "_manifest.json",
    "2024-01-01|shard-3", ".hidden", "\x00empty", "%empty", "k" * 90 + "~" + "0" * 24,
]


@pytest.mark.parametrize("key", HOSTILE)
def test_encoded_component_is_one_safe_short_folder_name(key: str) -> None:
    enc = encode_component(key)
    assert enc and "/" not in enc and "\\" not in enc and not enc.startswith(".")
    assert all(32 < ord(c) < 127 for c in enc)
    assert len(enc) <= 140


def test_distinct_keys_give_distinct_folders() -> None:
    assert len({encode_component(k) for k in HOSTILE}) == len(HOSTILE)


def test_prefix_stays_under_the_asset_folder(tmp_path: Path) -> None:
    for key in HOSTILE:
        folder = (tmp_path / partition_prefix(["asset"], key)).resolve()
        assert folder.parent == (tmp_path / "asset").resolve()


@pytest.mark.parametrize("key", HOSTILE)
def test_hostile_partition_keys_commit_and_read_back(store: ObjectStore, key: str) -> None:
    parts = PartitionStore(store)
    parts.commit(["a"], key, {"data": (b"payload", "bin")}, format="json", rows=None,
                 run_id="r1")
    manifest, data = parts.read(["a"], key)
    assert data == b"payload" and manifest.partition == key
    if isinstance(store, LocalStore):
        assert all(p.resolve().is_relative_to(store.root) for p in store.root.rglob("*"))
