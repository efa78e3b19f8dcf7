"""The chaos suite's pipeline, its run worker, and the driver's tools.

Pipeline: ``texts`` -> ``scores`` (torch MLP, tests.helpers.pipeline) -> ``grades`` (a
second torch model over the scores). Both model stages checkpoint every 3 of 20 batches.

    python -m tests.helpers.chaos <base_uri> <partition> <asset,asset...>

is one run worker: it materializes the named assets of one partition in this process
(against S3 at ``$CHAOS_S3_ENDPOINT`` when set, e.g. a fault proxy), prints ``BATCH ...``
as batches complete, ``FAILURE <step>: <error chain>`` for each failed step, and last
``RESULT SUCCESS`` or ``RESULT FAILED`` (exit code 0 or 1).

Driver side: ``Worker`` (a worker process the test can kill, stop and read), ``damage``
(bit flip or truncation), ``fault_burst`` (proxy rules), ``Ledger`` (the invariants).
"""

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
import pandera.pandas as pa
import torch
from dagster_aws.s3 import S3Resource

from longrun_dagster import AtomicObjectStoreIOManager, CorruptObject, StageContext, model_stage
from longrun_dagster.attempt import read_record
from longrun_dagster.commit import MANIFEST, Manifest, PartitionStore
from longrun_dagster.layout import PartitionLayout
from tests.helpers import pipeline
from tests.helpers.s3proxy import Rule

ROOT = Path(__file__).parent.parent.parent
PARTITIONS = ["2024-01-01", "2024-01-02", "2024-01-03"]
ASSETS = ["texts", "scores", "grades"]
BATCHES = pipeline.ROWS // 10
"""Batches per stage and partition (both stages take 10 rows a batch)."""


# -- the pipeline ------------------------------------------------------------------------


class Graded(pa.DataFrameModel):
    id: str = pa.Field(str_length={"min_value": 1})
    grade: float = pa.Field(ge=0.0, le=1.0)
    passed: bool

    class Config:
        strict = True


def load_grader(stage: StageContext) -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1),
                               torch.nn.Sigmoid()).eval()


def grade_batch(batch: pd.DataFrame, stage: StageContext) -> pd.DataFrame:
    """Grade scored rows with a second small torch model."""
    delay = float(os.environ.get("BATCH_SLEEP", "0"))
    if delay:
        time.sleep(delay)
    x = np.stack([batch.score.to_numpy(), (batch.label == "high").to_numpy()], axis=1)
    with torch.no_grad():
        grade = stage.state(torch.from_numpy(x.astype(np.float32))).squeeze(1).numpy()
    if os.environ.get("ANNOUNCE_BATCHES"):
        print(f"BATCH grades {stage.batch_index}", flush=True)
    grade = grade.astype("float64")
    return pd.DataFrame({"id": batch.id.to_numpy(), "grade": grade, "passed": grade > 0.5})


grades = model_stage(
    upstream=pipeline.scores, schema=Graded, partitions_def=pipeline.DAYS, batch_size=10,
    checkpoint_every_batches=3, checkpoint_every_seconds=3600, setup=load_grader,
    name="grades",
)(grade_batch)

DEFS = {"texts": pipeline.texts, "scores": pipeline.scores, "grades": grades}


def io_manager(base_uri: str, endpoint: str | None = None, attempts: int = 3
               ) -> AtomicObjectStoreIOManager:
    s3 = S3Resource(endpoint_url=endpoint, region_name="us-east-1", max_attempts=attempts,
                    aws_access_key_id="testing", aws_secret_access_key="testing") \
        if endpoint else None
    return AtomicObjectStoreIOManager(base_uri=base_uri, s3=s3)


def materialize(io: AtomicObjectStoreIOManager, partition: str, selection: list[str]
                ) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        list(DEFS.values()), selection=[DEFS[a] for a in selection], partition_key=partition,
        resources={"io_manager": io}, raise_on_error=False,
        run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}},
    )


def error_chain(error: Any) -> str:
    """Every message in a Dagster SerializableErrorInfo chain, outermost first."""
    parts = []
    while error is not None:
        parts.append(error.message.strip())
        error = error.cause or error.context
    return " <- ".join(parts).replace("\n", " ")


def failures(result: dg.ExecuteInProcessResult) -> list[str]:
    found = []
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data is not None:
            found.append(f"{event.step_key}: {error_chain(event.step_failure_data.error)}")
        elif event.is_run_failure and event.event_specific_data is not None:
            error = getattr(event.event_specific_data, "error", None)
            if error is not None:
                found.append(f"run: {error_chain(error)}")
    return found


def main() -> int:
    base_uri, partition, selection = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    io = io_manager(base_uri, os.environ.get("CHAOS_S3_ENDPOINT"))
    result = materialize(io, partition, selection)
    for line in failures(result):
        print("FAILURE", line, flush=True)
    print("RESULT", "SUCCESS" if result.success else "FAILED", flush=True)
    return 0 if result.success else 1


# -- the driver's tools ------------------------------------------------------------------


class Worker:
    """One run worker process; its output is read in a thread, so the test can wait for
    batches, then kill or stop it at that moment."""

    def __init__(self, base_uri: str, partition: str, selection: list[str],
                 env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.helpers.chaos", base_uri, partition,
             ",".join(selection)], cwd=ROOT, env={**os.environ, **env},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.batches = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("BATCH"):
                self.batches += 1
        self.proc.stdout.close()

    def wait_for_batches(self, count: int, timeout: float = 120.0) -> bool:
        """Poll until ``count`` batches completed; False if the worker ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.batches >= count:
                return True
            if self.proc.poll() is not None:
                self._reader.join(10)
                return self.batches >= count
            time.sleep(0.01)
        raise AssertionError(f"no batch {count} within {timeout}s:\n{self.text[-3000:]}")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def finish(self, timeout: float = 180.0) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"worker still running after {timeout}s:\n"
                                 f"{self.text[-3000:]}") from None
        self._reader.join(10)
        return code

    @property
    def text(self) -> str:
        return "".join(self.lines)

    @property
    def failures(self) -> list[str]:
        return [line[len("FAILURE "):].strip() for line in self.lines
                if line.startswith("FAILURE ")]

    @property
    def succeeded(self) -> bool:
        return "RESULT SUCCESS\n" in self.lines


def damage(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """The bytes with one bit flipped or cut short, and which."""
    if len(data) > 1 and rng.random() < 0.5:
        cut = rng.randrange(0, len(data))
        return data[:cut], f"truncated to {cut} of {len(data)} bytes"
    at, bit = rng.randrange(len(data)), rng.randrange(8)
    flipped = bytearray(data)
    flipped[at] ^= 1 << bit
    return bytes(flipped), f"bit {bit} of byte {at} flipped"


S3_FAULTS = ["500", "503", "reset-before", "reset-after", "delay"]
S3_TARGETS = ["", "_manifest.json", "/data-", "_checkpoints", "cursor-"]


def fault_burst(rng: random.Random) -> list[Rule]:
    """One to three proxy rules: a fault, which requests it hits, how many times (a few,
    which botocore's retries may absorb, or enough to outlast them)."""
    rules = []
    for _ in range(rng.randint(1, 3)):
        fault = rng.choice(S3_FAULTS)
        times = rng.choice([1, 2, 3, 1000]) if fault != "delay" else rng.choice([5, 30])
        rules.append(Rule(fault, method=rng.choice(["", "GET", "PUT", "HEAD"]),
                          path=rng.choice(S3_TARGETS), times=times,
                          delay=rng.uniform(0.1, 0.8)))
    return rules


def describe_rules(rules: list[Rule]) -> str:
    return ", ".join(f"{r.fault}x{r.times if r.times < 1000 else 'inf'}"
                     f"[{r.method or '*'} {r.path or '*'}]" for r in rules)


# A failure message must name what failed and say what to do.
NAMES_WHAT = re.compile(r"(s3://|file://|partition '|asset \w)")
SAYS_WHAT_TO_DO = re.compile(
    r"(re-materialize|materialize it first|check the S3 endpoint|disk has space|re-run|"
    r"delete it|restore the object|fix the )", re.IGNORECASE)


def actionable(message: str) -> bool:
    return bool(NAMES_WHAT.search(message) and SAYS_WHAT_TO_DO.search(message))


@dataclass
class Ledger:
    """What the test knows: committed partitions as first seen, the objects it damaged,
    and the clean run's content versions. ``check`` asserts the invariants."""

    partitions: PartitionStore  # direct to the store, never through the proxy
    clean: dict[tuple[str, str], str]
    committed: dict[tuple[str, str], tuple[str, str | None]] = field(default_factory=dict)
    damaged: dict[tuple[str, str], str] = field(default_factory=dict)  # -> key damaged
    recomputed_after_damage: int = 0
    generations: dict[tuple[str, str], int] = field(default_factory=dict)
    """The newest claim generation seen per partition: claims never go back."""

    def manifest_key(self, asset: str, partition: str) -> str:
        return self.partitions.prefix([asset], partition) + MANIFEST

    def check(self, where: str) -> None:
        for asset in ASSETS:
            for partition in PARTITIONS:
                self._check_one(asset, partition, where)

    def _check_one(self, asset: str, partition: str, where: str) -> None:
        key = (asset, partition)
        name = f"{asset}[{partition}] {where}"
        try:
            manifest = self.partitions.lookup([asset], partition)
        except CorruptObject as exc:
            assert self.damaged.get(key, "").endswith(MANIFEST), \
                f"{name}: manifest fails verification, but the test did not damage it: {exc}"
            assert exc.uri.endswith(self.manifest_key(asset, partition)) and \
                self.manifest_key(asset, partition) in str(exc), f"{name}: {exc}"
            return
        self._check_generation(key, name)
        if manifest is None:
            assert key not in self.committed, f"{name}: a committed partition vanished"
            return
        self._check_not_recomputed(key, manifest, name)
        self._check_data(key, manifest, name)

    def _check_generation(self, key: tuple[str, str], name: str) -> None:
        record, _ = read_record(self.partitions.store, PartitionLayout.of([key[0]], key[1]))
        if record is None:
            return
        seen = self.generations.get(key, 0)
        assert record.generation >= seen, \
            f"{name}: claim generation went back from {seen} to {record.generation}"
        self.generations[key] = record.generation

    def forget(self, key: tuple[str, str]) -> None:
        """The test deleted the partition's record (the repair a message named)."""
        self.committed.pop(key, None)
        self.damaged.pop(key, None)
        self.generations.pop(key, None)

    def _check_not_recomputed(self, key: tuple[str, str], manifest: Manifest,
                              name: str) -> None:
        seen = (manifest.run_id, manifest.fingerprint)
        first = self.committed.setdefault(key, seen)
        if first == seen:
            return
        assert key in self.damaged, \
            f"{name}: committed partition was recomputed (run {first[0]} -> {seen[0]})"
        self.committed[key] = seen  # recomputed after the test damaged it: allowed
        del self.damaged[key]
        self.recomputed_after_damage += 1

    def _check_data(self, key: tuple[str, str], manifest: Manifest, name: str) -> None:
        try:
            self.partitions.verify(manifest)
        except CorruptObject as exc:
            damaged = self.damaged.get(key)
            assert damaged is not None and not damaged.endswith(MANIFEST), \
                f"{name}: committed data fails verification, not damaged by the test: {exc}"
            assert exc.uri.endswith(damaged) and damaged in str(exc), f"{name}: {exc}"
            return
        assert manifest.object("data") is not None
        assert manifest.data_version == self.clean[key], \
            f"{name}: committed data differs from clean"
        assert key not in self.damaged or self.damaged[key].endswith(MANIFEST), \
            f"{name}: damaged object reads as intact"


def stop_then(worker: Worker, rng: random.Random) -> str:
    """SIGSTOP, a pause, then SIGKILL (a frozen process reaped) or SIGCONT (it goes on)."""
    worker.signal(signal.SIGSTOP)
    time.sleep(rng.uniform(0.2, 1.2))
    if rng.random() < 0.5:
        worker.signal(signal.SIGKILL)
        worker.signal(signal.SIGCONT)
        return "stop+kill"
    worker.signal(signal.SIGCONT)
    return "stop+cont"


if __name__ == "__main__":
    sys.exit(main())
