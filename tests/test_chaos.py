"""Chaos: one seeded random loop that mixes every fault, checking all invariants each step.

A two-stage torch pipeline (texts -> scores -> grades, 3 partitions) is materialized by
run worker processes against S3 (moto server) behind a fault-injecting proxy on loopback.
Each step picks a partition, which stages to materialize, and one fault: kill -9 of the
worker after a random number of batches, SIGSTOP then kill or continue, a burst of S3
faults (5xx, 503 SlowDown, connection reset before or after forwarding, slow answers),
damage to a random stored object (committed data, a manifest record with its claim, a
checkpoint cursor or shard: a bit flip or a truncation, written straight to the bucket),
or none.
A second, smaller loop fills a real small disk (tmpfs) under the local backend.

After every step: (a) a committed partition keeps its manifest (run id, fingerprint)
unless the test damaged it; (b) every committed partition verifies and its data equals
the clean run's bytes, or, where the test damaged it, reading it raises CorruptObject
naming the damaged object; (c) every failed step's messages name what failed and say
what to do. At the end, after the repair the messages name and fault-free runs, (d) every
partition's data equals the clean run's byte for byte (SHA-256); and throughout, (e) a
partition's claim generation never goes back.

    LONGRUN_CHAOS_SEED=<n>    replay a run (the seed is printed; CI runs fixed seeds, the
                              soaks new random ones)
    LONGRUN_CHAOS_STEPS=<n>   S3 loop steps (CI default 4; the slow soak test: 40)
    LONGRUN_CHAOS_DISK_STEPS=<n>  disk-full loop steps (CI default 2; soak: 15)
"""

import os
import random
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from longrun_dagster import AtomicObjectStoreIOManager, CorruptObject
from longrun_dagster.commit import MANIFEST, PartitionStore
from longrun_dagster.storage import LocalStore, ObjectStore, S3Store
from tests.conftest import s3_client, small_tmpfs
from tests.helpers import chaos
from tests.helpers.chaos import ASSETS, PARTITIONS, Ledger, Worker
from tests.helpers.s3proxy import FaultProxy

SELECTIONS = [["scores"], ["grades"], ["scores", "grades"], ["scores", "grades"]]
STEP_KINDS = {"none": 1, "kill-9": 3, "sigstop": 2, "s3-burst": 3, "damage": 2}
ENV = {"ANNOUNCE_BATCHES": "1", "BATCH_SLEEP": "0.02", "PYTHONUNBUFFERED": "1"}


def chaos_seed(fixed: int | None) -> int:
    """``LONGRUN_CHAOS_SEED``, else ``fixed`` (the CI tests: a red CI must replay), else a
    new random seed (the soaks explore)."""
    seed = int(os.environ.get("LONGRUN_CHAOS_SEED") or
               (fixed if fixed is not None else random.SystemRandom().randrange(2**31)))
    print(f"chaos seed {seed} (replay with LONGRUN_CHAOS_SEED={seed})")
    return seed


def chaos_steps(default: int) -> int:
    return int(os.environ.get("LONGRUN_CHAOS_STEPS") or default)


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], str]:
    """SHA-256 of every partition's data object in an uninterrupted run."""
    io = chaos.io_manager((tmp_path_factory.mktemp("clean") / "lr").as_uri())
    for partition in PARTITIONS:
        result = chaos.materialize(io, partition, ASSETS)
        assert result.success, chaos.failures(result)
    digests = {}
    for asset in ASSETS:
        for partition in PARTITIONS:
            manifest = io.partition_store().lookup([asset], partition)
            assert manifest is not None and manifest.object("data") is not None
            digests[(asset, partition)] = manifest.data_version
    return digests


@dataclass
class Chaos:
    """One chaos run: the store (direct), how workers reach it, and what happened."""

    base_uri: str
    ledger: Ledger
    rng: random.Random
    env: dict[str, str]
    proxy: FaultProxy | None = None
    disk: Path | None = None  # a small filesystem under the local store, for disk-full
    faults: Counter[str] = field(default_factory=Counter)
    failed_steps: int = 0
    messages: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)

    @property
    def store(self) -> ObjectStore:
        return self.ledger.partitions.store

    def run(self, partition: str, selection: list[str]) -> Worker:
        return Worker(self.base_uri, partition, selection, self.env)

    def judge(self, worker: Worker, code: int, killed: bool, step: str) -> None:
        """(c): a failure the test did not cause by killing says what and what to do."""
        if killed or code == 0:
            return
        self.failed_steps += 1
        assert worker.failures, f"{step}: worker failed without a message:\n{worker.text[-4000:]}"
        for message in worker.failures:
            self.messages.append(message)
            assert chaos.actionable(message), f"{step}: message does not name what failed " \
                f"and what to do:\n{message}"

    def pending(self, partition: str, selection: list[str]) -> int:
        """Batches a run of ``selection`` would compute: not committed stages whose upstream
        is committed or selected too (a committed stage is reused, at most checkpointed
        batches are skipped)."""
        batches, ready = 0, True
        for asset in ASSETS[1:]:  # upstream first
            committed = self.committed(asset, partition)
            if asset in selection and not committed and ready:
                batches += chaos.BATCHES
            ready = ready and (committed or asset in selection)
        return batches

    def committed(self, asset: str, partition: str) -> bool:
        try:
            return self.ledger.partitions.lookup([asset], partition) is not None
        except CorruptObject:
            return False  # a damaged record: the partition is recomputed once repaired

    def choose(self, kind: str) -> tuple[str, list[str], int]:
        """Partition, selection and its pending batches; a kill or stop aims at a run that
        has work to do (else most of them land after the worker ended)."""
        choices = [(p, s) for p in PARTITIONS for s in SELECTIONS]
        if kind in ("kill-9", "sigstop"):
            choices = [c for c in choices if self.pending(*c)] or choices
        partition, selection = self.rng.choice(choices)
        return partition, selection, self.pending(partition, selection)

    def step(self, index: int, kind: str) -> None:
        partition, selection, pending = self.choose(kind)
        what = kind
        if kind == "damage":
            what = self.damage()
        if kind == "s3-burst":
            assert self.proxy is not None
            self.proxy.rules[:] = chaos.fault_burst(self.rng)
            what = f"s3-burst {chaos.describe_rules(self.proxy.rules)}"
        if kind == "disk-full":
            assert self.disk is not None
            stat = os.statvfs(self.disk)
            headroom = self.rng.randint(0, 64 * 1024)
            (self.disk / "ballast").write_bytes(
                b"\0" * max(0, stat.f_bavail * stat.f_frsize - headroom))
            what = f"disk-full ({headroom} bytes left)"
        started = time.monotonic()
        worker = self.run(partition, selection)
        killed = False
        if kind in ("kill-9", "sigstop"):
            if worker.wait_for_batches(self.rng.randint(0, max(pending, 1) - 1)):
                time.sleep(self.rng.uniform(0, 0.1))
                if kind == "kill-9":
                    worker.signal(signal.SIGKILL)
                    what = f"kill-9 after {worker.batches} batches"
                else:
                    what = f"{chaos.stop_then(worker, self.rng)} after {worker.batches} batches"
                killed = "kill" in what
            else:
                what = f"{kind} (worker ended first)"
        code = worker.finish()
        if self.proxy is not None:
            self.proxy.rules.clear()
        if self.disk is not None:
            (self.disk / "ballast").unlink(missing_ok=True)
        killed = killed and code == -signal.SIGKILL
        self.faults[what.split(" ")[0] if "ended first" not in what else "none"] += 1
        line = (f"step {index}: {partition} {'+'.join(selection)}: {what} -> "
                f"{'killed' if killed else 'ok' if code == 0 else 'failed'} "
                f"({time.monotonic() - started:.1f}s)")
        self.log.append(line)
        print(line)
        self.judge(worker, code, killed, line)
        self.ledger.check(f"after {line}")

    def unchanged_size(self, asset: str, partition: str, key: str) -> bool:
        """A model stage's data object damaged without changing its size: re-materializing
        reuses it (a stat cannot tell), so its CorruptObject says to delete the manifest."""
        if asset == "texts" or key.endswith(MANIFEST):
            return False
        manifest = self.ledger.partitions.lookup([asset], partition)
        assert manifest is not None
        stored = next(o for o in manifest.objects if key.endswith(o.name))
        if self.store.stat(key).size != stored.size:
            return False
        with pytest.raises(CorruptObject) as err:
            self.ledger.partitions.verify(manifest)
        manifest_uri = self.store.uri_of(self.ledger.manifest_key(asset, partition))
        assert f"delete the manifest {manifest_uri} first" in str(err.value)
        return True

    def intact(self, asset: str, partition: str) -> bool:
        if (asset, partition) in self.ledger.damaged:
            return False
        return self.ledger.partitions.lookup([asset], partition) is not None

    def damage(self) -> str:
        """Bit flip or truncate one random stored object, straight in the store."""
        targets = self.damage_targets()
        kinds = [k for k, keys in targets.items() if keys]
        if not kinds:
            return "damage (nothing stored yet)"
        kind = self.rng.choice(kinds)
        key = self.rng.choice(sorted(targets[kind]))
        data, _ = self.store.get(key)
        bad, how = chaos.damage(data, self.rng)
        self.store.put(key, bad)
        if kind in ("manifest", "data"):
            asset, partition = owner(self.ledger.partitions, key)
            self.ledger.damaged[(asset, partition)] = key
        return f"damage {kind} {key}: {how}"

    def damage_targets(self) -> dict[str, set[str]]:
        targets: dict[str, set[str]] = {"manifest": set(), "data": set(), "checkpoint": set()}
        for info in self.store.list(""):
            if "/_checkpoints/" in info.key:
                targets["checkpoint"].add(info.key)
        for asset in ASSETS:
            for partition in PARTITIONS:
                if (asset, partition) in self.ledger.damaged:
                    continue  # one damage per partition at a time: the ledger tracks one
                manifest = self.ledger.partitions.lookup([asset], partition)
                if manifest is None:
                    continue
                prefix = self.ledger.partitions.prefix([asset], partition)
                targets["manifest"].add(prefix + MANIFEST)
                targets["data"] |= {prefix + o.name for o in manifest.objects}
        return targets

    def finish(self) -> None:
        """(d): the repair the messages name, then fault-free runs of every partition."""
        for (asset, partition), key in sorted(self.ledger.damaged.items(),
                                              key=lambda kv: ASSETS.index(kv[0][0])):
            how = "re-materialize"
            if key.endswith(MANIFEST) or self.unchanged_size(asset, partition, key):
                how = "delete manifest, re-materialize"  # what the message says to do
                self.store.delete(self.ledger.manifest_key(asset, partition))
                self.ledger.forget((asset, partition))
            worker = self.run(partition, [asset])
            code = worker.finish()
            self.log.append(f"repair {asset}[{partition}] ({key.rsplit('/', 1)[1]}): "
                            f"{how} -> {'ok' if code == 0 else 'failed'}")
            print(self.log[-1])
            self.judge(worker, code, False, f"repair of {asset}[{partition}]")
        for partition in PARTITIONS:
            if all(self.intact(asset, partition) for asset in ASSETS):
                continue  # the ledger has checked it; a run would only reuse it
            worker = self.run(partition, ["scores", "grades"])
            code = worker.finish()
            assert code == 0, f"fault-free run of {partition} failed:\n{worker.text[-4000:]}"
        self.ledger.check("after the fault-free runs")
        assert not self.ledger.damaged, \
            f"re-materializing did not repair the damaged partitions {self.ledger.damaged}"
        for key, digest in self.ledger.clean.items():
            manifest = self.ledger.partitions.lookup([key[0]], key[1])
            assert manifest is not None and manifest.object("data") is not None
            assert manifest.data_version == digest, \
                f"{key}: final output differs from a clean run"


def owner(partitions: PartitionStore, key: str) -> tuple[str, str]:
    for asset in ASSETS:
        for partition in PARTITIONS:
            if key.startswith(partitions.prefix([asset], partition)):
                return asset, partition
    raise AssertionError(f"{key} belongs to no partition of the pipeline")


def seed_texts(base_uri: str, endpoint: str | None) -> None:
    io = chaos.io_manager(base_uri, endpoint)
    for partition in PARTITIONS:
        assert chaos.materialize(io, partition, ["texts"]).success


def report(run: Chaos, seed: int, steps: int, started: float) -> None:
    print(f"chaos seed {seed}: {steps} steps in {time.monotonic() - started:.0f}s; faults "
          f"{dict(run.faults)}; {run.failed_steps} failed steps, all messages actionable; "
          f"{run.ledger.recomputed_after_damage} damaged partitions recomputed")
    for message in sorted(set(run.messages)):
        print("  message:", message[:400])


def s3_chaos(steps: int, proxy: FaultProxy, s3_endpoint: str, s3_bucket: str,
             clean: dict[tuple[str, str], str], seed: int | None = None) -> None:
    seed = chaos_seed(seed)
    started = time.monotonic()
    base_uri = f"s3://{s3_bucket}/lr"
    seed_texts(base_uri, s3_endpoint)
    direct = PartitionStore(S3Store(s3_client(s3_endpoint), s3_bucket, "lr"))
    run = Chaos(base_uri, Ledger(direct, clean), random.Random(seed),
                {**ENV, "CHAOS_S3_ENDPOINT": proxy.url},  # type: ignore[attr-defined]
                proxy=proxy)
    run.ledger.check("after seeding texts")
    kinds, weights = list(STEP_KINDS), list(STEP_KINDS.values())
    for index in range(steps):
        run.step(index, run.rng.choices(kinds, weights)[0])
    run.finish()
    report(run, seed, steps, started)


@pytest.mark.s3
@pytest.mark.timeout(600)
def test_chaos_s3_a_few_steps(proxy: FaultProxy, s3_endpoint: str, s3_bucket: str,
                              clean: dict[tuple[str, str], str]) -> None:
    s3_chaos(chaos_steps(4), proxy, s3_endpoint, s3_bucket, clean, seed=7)


@pytest.mark.s3
@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_chaos_s3_soak(proxy: FaultProxy, s3_endpoint: str, s3_bucket: str,
                       clean: dict[tuple[str, str], str]) -> None:
    s3_chaos(chaos_steps(40), proxy, s3_endpoint, s3_bucket, clean)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB filesystem (root only; skipped where mounting is not allowed)."""
    with small_tmpfs(tmp_path, "16m") as mount:
        yield mount


def disk_chaos(steps: int, disk: Path, clean: dict[tuple[str, str], str],
               seed: int | None = None) -> None:
    seed = chaos_seed(seed)
    started = time.monotonic()
    base_uri = (disk / "lr").as_uri()
    seed_texts(base_uri, None)
    run = Chaos(base_uri, Ledger(PartitionStore(LocalStore(disk / "lr")), clean),
                random.Random(seed), dict(ENV), disk=disk)
    for index in range(steps):
        kind = run.rng.choice(["disk-full", "disk-full", "kill-9", "damage"])
        run.step(index, "disk-full" if index == 0 else kind)
    run.finish()
    report(run, seed, steps, started)


def test_chaos_disk_full_on_the_local_backend(small_disk: Path,
                                              clean: dict[tuple[str, str], str]) -> None:
    disk_chaos(int(os.environ.get("LONGRUN_CHAOS_DISK_STEPS") or 2), small_disk, clean,
               seed=3)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_chaos_disk_full_soak(small_disk: Path, clean: dict[tuple[str, str], str]) -> None:
    disk_chaos(int(os.environ.get("LONGRUN_CHAOS_DISK_STEPS") or 15), small_disk, clean)


# -- regressions the chaos loop found ------------------------------------------------------


def committed(tmp_path: Path, assets: list[str]) -> AtomicObjectStoreIOManager:
    io = chaos.io_manager((tmp_path / "lr").as_uri())
    assert chaos.materialize(io, PARTITIONS[0], assets).success
    return io


def flip(store: ObjectStore, key: str, cut: bool = False) -> None:
    data, _ = store.get(key)
    store.put(key, data[: len(data) // 2] if cut else bytes([data[0] ^ 1]) + data[1:])


@pytest.mark.parametrize("asset", ["texts", "scores"])
def test_a_damaged_manifest_names_its_repair_and_the_repair_works(
        tmp_path: Path, clean: dict[tuple[str, str], str], asset: str) -> None:
    """A damaged _manifest.json said "re-materialize the partition", but every
    re-materialization failed with the same CorruptObject. The record now also holds the
    partition's claim, so it is never overwritten blindly (that would restart the claim's
    generation): readers and writers alike say to delete it and re-materialize, and doing
    exactly that works (for a stage and for a plain asset alike)."""
    io = committed(tmp_path, ["texts", "scores"])
    partitions = io.partition_store()
    key = partitions.prefix([asset], PARTITIONS[0]) + MANIFEST
    flip(partitions.store, key)
    damaged = partitions.store.get(key)[0]
    with pytest.raises(CorruptObject, match="delete it .*re-materialize the partition"):
        partitions.lookup([asset], PARTITIONS[0])
    refused = chaos.materialize(io, PARTITIONS[0], [asset])
    assert not refused.success
    [message, *_] = chaos.failures(refused)
    assert chaos.actionable(message) and "delete it" in message, message
    assert partitions.store.get(key)[0] == damaged, "a damaged record must not be overwritten"
    partitions.store.delete(key)  # the repair the message names
    result = chaos.materialize(io, PARTITIONS[0], [asset])
    assert result.success, chaos.failures(result)
    assert chaos.materialize(io, PARTITIONS[0], ["scores", "grades"]).success
    for name in ASSETS:
        assert content_version(io, name) == clean[(name, PARTITIONS[0])]


def test_a_stage_recomputes_a_committed_partition_whose_object_is_cut_short(
        tmp_path: Path, clean: dict[tuple[str, str], str]) -> None:
    """A stage reused a partition whose data object was truncated (its manifest intact),
    so downstream kept failing with CorruptObject saying "re-materialize partition ... of
    asset scores", and re-materializing reused the damaged partition again."""
    io = committed(tmp_path, ["texts", "scores"])
    partitions = io.partition_store()
    manifest = partitions.lookup(["scores"], PARTITIONS[0])
    assert manifest is not None and (data := manifest.object("data")) is not None
    flip(partitions.store, partitions.prefix(["scores"], PARTITIONS[0]) + data.name, cut=True)
    failed = chaos.materialize(io, PARTITIONS[0], ["grades"])
    [message, *_] = chaos.failures(failed)
    assert "re-materialize partition '2024-01-01' of asset scores" in message
    assert chaos.materialize(io, PARTITIONS[0], ["scores"]).success
    assert chaos.materialize(io, PARTITIONS[0], ["grades"]).success
    for name in ASSETS:
        assert content_version(io, name) == clean[(name, PARTITIONS[0])]


def test_a_damaged_claim_names_itself_and_the_fix(tmp_path: Path) -> None:
    """A damaged _lease.json failed the stage with a bare JSONDecodeError that named
    neither the object nor what to do; the claim now lives in the manifest record."""
    partitions = PartitionStore(LocalStore(tmp_path))
    partitions.begin(["scores"], "p", run_id="r1", fingerprint="f").claim()
    flip(partitions.store, partitions.prefix(["scores"], "p") + MANIFEST, cut=True)
    with pytest.raises(CorruptObject) as err:
        partitions.begin(["scores"], "p", run_id="r2", fingerprint="f").claim()
    assert "_manifest.json" in str(err.value) and "delete it" in str(err.value) \
        and "re-materialize" in str(err.value)


def content_version(io: AtomicObjectStoreIOManager, asset: str) -> str:
    manifest = io.partition_store().lookup([asset], PARTITIONS[0])
    assert manifest is not None, f"{asset} is not committed"
    return manifest.data_version
