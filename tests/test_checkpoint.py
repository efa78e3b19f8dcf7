"""Checkpointer: atomic save, verified restore, fallback past damaged checkpoints."""

import logging
import threading
import time
from typing import Any

import pytest
import torch

from longrun_dagster import Checkpointer
from longrun_dagster.storage import ObjectStore

PREFIX = "asset/p=x/_checkpoints/abc"


def objects(store: ObjectStore) -> dict[str, int]:
    return {i.key.rsplit("/", 1)[1]: i.size for i in store.list(PREFIX)}


def damage(store: ObjectStore, key: str, how: str) -> None:
    data, _ = store.get(key)
    if how == "truncate":
        data = data[: len(data) // 2]
    else:
        data = data[:10] + bytes([data[10] ^ 0x01]) + data[11:]
    store.put(key, data)


def test_custom_loop_state_roundtrip(store: ObjectStore) -> None:
    ckpt = Checkpointer(store, PREFIX)
    assert ckpt.restore() is None
    state = {"weight": torch.arange(6, dtype=torch.float32), "step": torch.tensor([7])}
    ckpt.save(7, state)
    restored = Checkpointer(store, PREFIX).restore()
    assert restored is not None and restored.step == 7
    assert torch.equal(restored.state["weight"], state["weight"])


def test_shards_accumulate_across_saves(store: ObjectStore) -> None:
    ckpt = Checkpointer(store, PREFIX)
    ckpt.save(1, new_shards=[("valid", b"one")])
    ckpt.save(2, new_shards=[("valid", b"two"), ("quarantine", b"q")])
    restored = Checkpointer(store, PREFIX).restore()
    assert restored is not None
    assert restored.shards == [("valid", b"one"), ("valid", b"two"), ("quarantine", b"q")]


@pytest.mark.parametrize("how", ["truncate", "bitflip"])
@pytest.mark.parametrize("target", ["shard", "cursor"])
def test_damaged_newest_checkpoint_falls_back_and_says_so(
    store: ObjectStore, how: str, target: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A truncated or bit-flipped newest checkpoint must not be resumed from."""
    ckpt = Checkpointer(store, PREFIX)
    ckpt.save(3, {"step": 3}, new_shards=[("valid", b"a" * 100)])
    ckpt.save(6, {"step": 6}, new_shards=[("valid", b"b" * 100)])
    newest = [k for k in objects(store) if k.startswith(target) and "000006" in k]
    assert newest
    damage(store, f"{PREFIX}/{newest[0]}", how)
    with caplog.at_level(logging.WARNING):
        restored = Checkpointer(store, PREFIX).restore()
    assert restored is not None and restored.step == 3
    assert restored.state == {"step": 3} and restored.shards == [("valid", b"a" * 100)]
    assert len(restored.skipped) == 1 and "000006" in restored.skipped[0]
    assert "falling back" in caplog.text and newest[0] in caplog.text


def test_every_checkpoint_damaged_starts_over_and_says_so(
    store: ObjectStore, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = Checkpointer(store, PREFIX)
    ckpt.save(1, {"a": 1})
    for name in objects(store):
        damage(store, f"{PREFIX}/{name}", "truncate")
    with caplog.at_level(logging.WARNING):
        assert Checkpointer(store, PREFIX).restore() is None
    assert "starting from the beginning" in caplog.text


def test_old_checkpoints_are_pruned(store: ObjectStore) -> None:
    ckpt = Checkpointer(store, PREFIX, keep=2)
    for step in range(1, 6):
        ckpt.save(step, {"step": step})
    names = objects(store)
    assert sorted(n for n in names if n.startswith("cursor")) == [
        "cursor-000000000004.json", "cursor-000000000005.json"]
    assert len([n for n in names if n.startswith("state")]) == 2


def test_background_saves_keep_at_most_one_write_in_flight(tmp_path: Any) -> None:
    """Saving must not stall the loop, but never queue more than one write."""
    from longrun_dagster.storage import LocalStore

    store = LocalStore(tmp_path)
    active, peak = 0, 0
    lock = threading.Lock()
    real_put = store.put

    def slow_put(key: str, data: bytes, **kw: Any) -> Any:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.05)
        try:
            return real_put(key, data, **kw)
        finally:
            with lock:
                active -= 1

    store.put = slow_put  # type: ignore[method-assign]
    ckpt = Checkpointer(store, PREFIX, background=True)
    began = time.monotonic()
    ckpt.save(1, {"step": 1})
    assert time.monotonic() - began < 0.05  # returned before the write finished
    for step in range(2, 5):
        ckpt.save(step, {"step": step})
    ckpt.close()
    assert peak == 1
    restored = Checkpointer(store, PREFIX).restore()
    assert restored is not None and restored.step == 4


def test_failed_background_write_surfaces_on_next_save(tmp_path: Any) -> None:
    from longrun_dagster.storage import LocalStore

    store = LocalStore(tmp_path)

    def broken(key: str, data: bytes, **kw: Any) -> Any:
        raise OSError(28, "No space left on device")

    store.put = broken  # type: ignore[method-assign]
    ckpt = Checkpointer(store, PREFIX, background=True)
    ckpt.save(1, {"a": 1})
    with pytest.raises(OSError, match="No space left"):
        ckpt.flush()
