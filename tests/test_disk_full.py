"""Disk full on the local backend, for real: a small tmpfs mounted by the test (root only;
skipped where mounting is not allowed)."""

import os
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from longrun_dagster import AtomicObjectStoreIOManager, StorageError
from longrun_dagster.commit import PartitionStore
from longrun_dagster.storage import LocalStore
from tests.conftest import small_tmpfs
from tests.helpers import pipeline

MB = 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB filesystem."""
    with small_tmpfs(tmp_path, "8m") as mount:
        yield mount


def leftovers(root: Path) -> list[str]:
    return [p.name for p in root.rglob("*") if p.name.startswith(".tmp-")]


def test_disk_full_fails_clearly_keeps_the_old_version_and_leaves_no_temp_files(
    small_disk: Path,
) -> None:
    store = LocalStore(small_disk)
    partitions = PartitionStore(store)
    old = os.urandom(2 * MB)
    partitions.commit(["a"], "p", {"data": (old, "bin")}, format="bytes", rows=None,
                      run_id="old")
    with pytest.raises(StorageError) as err:
        partitions.commit(["a"], "p", {"data": (os.urandom(10 * MB), "bin")},
                          format="bytes", rows=None, run_id="new")
    text = str(err.value)
    assert "No space left" in text and "disk has space" in text and str(small_disk) in text
    assert bytes(partitions.read(["a"], "p")[1]) == old
    assert leftovers(small_disk) == []


def test_stage_on_a_full_disk_fails_then_resumes_once_space_is_freed(
    small_disk: Path, tmp_path: Path,
) -> None:
    """A checkpoint that cannot be written fails the stage; after space is freed the
    partition resumes and commits output identical to a clean run."""
    io = AtomicObjectStoreIOManager(base_uri=small_disk.as_uri())
    clean = AtomicObjectStoreIOManager(base_uri=(tmp_path / "clean").as_uri())
    day = "2024-01-02"
    assert dg.materialize([pipeline.texts, pipeline.scores], partition_key=day,
                          resources={"io_manager": clean}).success
    assert dg.materialize([pipeline.texts], partition_key=day,
                          resources={"io_manager": io}).success
    ballast = small_disk / "ballast"
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    ballast.write_bytes(b"\0" * (free - 2048))  # leave almost nothing
    result = dg.materialize([pipeline.texts, pipeline.scores], partition_key=day,
                            resources={"io_manager": io}, selection=[pipeline.scores],
                            raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "disk has space" in str(failure.step_failure_data.error)  # type: ignore[union-attr]
    assert io.partition_store().lookup(["scores"], day) is None
    ballast.unlink()
    again = dg.materialize([pipeline.texts, pipeline.scores], partition_key=day,
                           resources={"io_manager": io}, selection=[pipeline.scores])
    assert again.success
    assert pipeline.committed_sha(io, day) == pipeline.committed_sha(clean, day)
    assert leftovers(small_disk) == []
