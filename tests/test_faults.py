"""Crashes and races against the commit protocol, injected for real in separate processes.

A writer process is killed with SIGKILL at several points of a large commit; afterwards a
reader sees the previous version whole, or (for a first write) nothing, never a torn
object. Two writer processes racing on one partition leave exactly one version, whole.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import pytest

from longrun_dagster.commit import PartitionStore
from longrun_dagster.storage import ObjectStore
from tests.helpers.writer import payload, store_spec

ROOT = Path(__file__).parent.parent
ASSET = ["big"]
PART = "2024-01-01"
SIZE = 12 * 1024 * 1024  # above the test S3 multipart threshold: exercises multipart too
ROUNDS = int(os.environ.get("LONGRUN_FAULT_ROUNDS", "2"))


class Writer:
    def __init__(self, store: ObjectStore, seed: int, **spec: Any) -> None:
        body = {"store": store_spec(store), "asset": ASSET, "partition": PART, "size": SIZE,
                "seed": seed, **spec}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.helpers.writer", json.dumps(body)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.seen: list[str] = []

    def wait_for(self, line: str, timeout: float = 60.0) -> None:
        out: IO[str] = self.proc.stdout  # type: ignore[assignment]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = out.readline()
            if not got:
                raise AssertionError(f"writer exited before {line!r}; said {self.seen}")
            self.seen.append(got.strip())
            if got.startswith(line):
                return
        raise AssertionError(f"writer never said {line!r}; said {self.seen}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        if self.proc.stdout:  # what it said before it died
            self.seen += [line.strip() for line in self.proc.stdout]
            self.proc.stdout.close()

    def finish(self) -> int:
        out, _ = self.proc.communicate(timeout=60)
        self.seen += out.split("\n")
        return self.proc.returncode


def readable(store: ObjectStore) -> bytes | None:
    """What a reader gets: the verified data, or None if the partition is not committed."""
    partitions = PartitionStore(store)
    if partitions.lookup(ASSET, PART) is None:
        return None
    return partitions.read(ASSET, PART)[1]


def commit_old(store: ObjectStore) -> bytes:
    data = payload(1, SIZE)
    PartitionStore(store).commit(ASSET, PART, {"data": (data, "bin")}, format="bytes",
                                 rows=None, run_id="old")
    return data


# (line to wait for, random extra delay before the kill): mid data write, between data and
# manifest, mid manifest write.
KILL_POINTS = {
    "before-data": ("PAUSED", 0.0, "data"),
    "mid-data": ("BEGIN data", 0.25, None),
    "between-data-and-manifest": ("PAUSED", 0.0, "manifest"),
    "mid-manifest": ("BEGIN manifest", 0.01, None),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
@pytest.mark.parametrize("previous", ["old-version", "first-write"])
def test_kill_9_mid_commit_leaves_old_version_or_nothing_never_torn(
    store: ObjectStore, point: str, previous: str
) -> None:
    """kill -9 of a writer mid-commit must never leave a torn or mixed partition readable."""
    line, jitter, pause = KILL_POINTS[point]
    rng = random.Random(f"{point}-{previous}")
    landed = attempts = 0
    while landed < ROUNDS and attempts < 6 * ROUNDS:
        attempts += 1
        old = commit_old(store) if previous == "old-version" else None
        writer = Writer(store, seed=2, pause_before=pause)
        writer.wait_for(line)
        time.sleep(rng.uniform(0, jitter))
        writer.kill()
        got = readable(store)
        if "BEGIN manifest" in writer.seen:
            assert got in (old, payload(2, SIZE)), "a reader saw neither version whole"
        else:
            assert got == old, f"after a kill at {point} the reader must see {previous}"
        if point != "mid-data" or "END data" not in writer.seen:
            landed += 1
        else:
            jitter /= 2  # the write finished first: kill sooner next time
        # Leftovers of the dead attempt are garbage, never data; collecting them keeps the
        # committed version readable.
        PartitionStore(store).collect_garbage(ASSET, older_than_s=0)
        assert readable(store) == got
        for info in store.list(""):
            store.delete(info.key)
    assert landed == ROUNDS, f"only {landed} of {attempts} kills landed at {point}"


@pytest.mark.parametrize("previous", ["old-version", "first-write"])
def test_two_concurrent_writer_processes_leave_exactly_one_version(
    store: ObjectStore, previous: str, tmp_path: Path
) -> None:
    """Two processes committing one partition at the same instant: one wins, whole."""
    old = commit_old(store) if previous == "old-version" else None
    release = tmp_path / "go"
    writers = [Writer(store, seed=s, pause_before="manifest", release=str(release))
               for s in (2, 3)]
    for w in writers:
        w.wait_for("PAUSED")  # both have written their data and read the same manifest token
    release.touch()
    codes = sorted(w.finish() for w in writers)
    assert codes == [0, 3], [w.seen for w in writers]
    loser = next(w for w in writers if w.proc.returncode == 3)
    conflict = next(s for s in loser.seen if s.startswith("CONFLICT"))
    assert "was committed by run writer-" in conflict
    got = readable(store)
    assert got in (payload(2, SIZE), payload(3, SIZE)) and got != old
