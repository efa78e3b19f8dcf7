"""Random interleavings of attempts at ONE partition (begin, claim, checkpoint, commit,
zombie wake-ups, readers, GC, crash leftovers, damaged objects) against a model of the
commit protocol, on LocalStore and on a real S3 endpoint (moto server on loopback).

The model predicts every outcome exactly: which claim is ``Claimed`` (and its generation)
or ``Reused``, which commit lands, is refused with ``LeaseLost`` (a superseded claim) or
``CommitConflict``/``Reused`` (an unclaimed attempt that lost the race), what a reader
gets, and what GC may and may not delete. CI runs a bounded number of examples;
``LONGRUN_SLOW=1`` runs many more.
"""

import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from longrun_dagster.attempt import Claimed, Committed, PartitionAttempt, Reused, read_record
from longrun_dagster.checkpoint import Checkpointer
from longrun_dagster.commit import PartitionStore
from longrun_dagster.errors import (
    CommitConflict,
    ConfigError,
    CorruptObject,
    LeaseLost,
    PartitionNotCommitted,
)
from longrun_dagster.layout import PartitionLayout, is_partition_folder
from longrun_dagster.manifest import Manifest
from longrun_dagster.storage import LocalStore, ObjectStore, S3Store
from tests.conftest import s3_client

A = ["stage", "scores"]
P = "2024-01-01"
FINGERPRINTS = ("f1", "f2")
SLOW = os.environ.get("LONGRUN_SLOW") == "1"

def _settings(ci_examples: int) -> settings:
    return settings(
        max_examples=500 if SLOW else ci_examples,
        stateful_step_count=50 if SLOW else 30,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


READER_MARGIN_S = 5.0
"""Slack between computing a reader-safe grace and GC reading the clock."""

StoreFactory = Callable[[], ObjectStore]


@dataclass
class Version:
    """A committed version as the model knows it."""

    manifest: Manifest
    payload: bytes
    fingerprint: str
    damage: str | None = None  # None, "flip" (same size) or "truncate"


@dataclass
class AttemptModel:
    obj: PartitionAttempt
    run_id: str
    fingerprint: str
    seen_ver: int  # the record version its ``_seen`` was read at
    claim_ver: int | None = None  # the record version its own claim wrote (None: no claim)
    superseded: bool = False  # a newer record write came after its claim, before its commit
    ckpt: Checkpointer | None = None
    steps: list[int] = field(default_factory=list)


@dataclass
class Reader:
    manifest: Manifest
    version: Version
    looked_up_at: float
    maybe_collected: bool = False  # a grace-0 GC ran after it was superseded


def _same(a: Manifest | None, b: Manifest | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and a == b)


class AttemptMachine(RuleBasedStateMachine):
    """Attempts at one partition against a model of the protocol."""

    make_store: StoreFactory

    def __init__(self) -> None:
        super().__init__()
        self.store = type(self).make_store()
        self.parts = PartitionStore(self.store)
        self.prefix = self.parts.prefix(A, P)
        self.layout = PartitionLayout.of(A, P)
        self.attempts: list[AttemptModel] = []
        self.readers: list[Reader] = []
        self.record_ver = 0  # successful writes of the record so far
        self.gen = 0  # the record's generation
        self.committed: Version | None = None
        self.failed_payloads: set[bytes] = set()  # payloads of commits that did not land
        self.leftovers: list[str] = []  # crash leftovers: names in the partition folder
        self.uploads: list[str] = []  # S3: unfinished multipart uploads (keys)
        self.counter = 0

    # -- helpers --------------------------------------------------------------------------

    def _reusable_now(self, fingerprint: str) -> bool:
        c = self.committed
        return c is not None and c.fingerprint == fingerprint and c.damage != "truncate"

    def _supersede_claims(self) -> None:
        for am in self.attempts:
            if am.claim_ver is not None and am.claim_ver < self.record_ver:
                am.superseded = True

    def _folder_names(self) -> set[str]:
        folder = self.prefix.rstrip("/")
        names = set()
        for info in self.store.list(self.prefix):
            parent, _, name = info.key.rpartition("/")
            if parent == folder and is_partition_folder(parent):
                names.add(name)
        return names

    # -- rules ----------------------------------------------------------------------------

    @initialize(fingerprints=st.lists(st.sampled_from(FINGERPRINTS), min_size=1, max_size=3))
    def some_attempts_begin(self, fingerprints: list[str]) -> None:
        """Concurrent attempts that began before anything was committed."""
        for fingerprint in fingerprints:
            self.begin(fingerprint)

    @rule(fingerprint=st.sampled_from(FINGERPRINTS))
    def begin(self, fingerprint: str) -> None:
        self.counter += 1
        run_id = f"r{self.counter}-{uuid.uuid4().hex[:6]}"
        obj = self.parts.begin(A, P, run_id=run_id, fingerprint=fingerprint)
        committed = self.committed.manifest if self.committed else None
        assert _same(obj.committed, committed)
        reusable = obj.reusable()
        if self._reusable_now(fingerprint):
            # a committed fingerprint is never recomputed (a flipped byte keeps the size)
            assert reusable is not None and reusable == committed, obj.problems
        else:
            assert reusable is None
            if self.committed and self.committed.fingerprint == fingerprint:
                assert any("bytes, its manifest says" in p for p in obj.problems), obj.problems
        self.attempts.append(AttemptModel(obj, run_id, fingerprint, seen_ver=self.record_ver))
        event("begin" + (": reusable" if reusable is not None else ""))

    @precondition(lambda self: self.attempts)
    @rule(i=st.integers(0, 63))
    def claim(self, i: int) -> None:
        am = self.attempts[i % len(self.attempts)]
        result = am.obj.claim()
        if am.seen_ver != self.record_ver and self._reusable_now(am.fingerprint):
            # the record changed since it looked, and it now holds this fingerprint
            assert isinstance(result, Reused), result
            assert self.committed is not None and result.manifest == self.committed.manifest
            am.seen_ver = self.record_ver
            event("claim: Reused")
            return
        assert isinstance(result, Claimed), result
        event("claim: Claimed")
        assert result.claim.generation == self.gen + 1 > self.gen  # generations only grow
        assert result.claim.run_id == am.run_id
        am.seen_ver = self.record_ver
        self.record_ver += 1
        self.gen = result.claim.generation
        am.claim_ver, am.superseded = self.record_ver, False
        self._supersede_claims()

    @precondition(lambda self: self.attempts)
    @rule(i=st.integers(0, 63), shard=st.binary(min_size=1, max_size=16))
    def checkpoint(self, i: int, shard: bytes) -> None:
        am = self.attempts[i % len(self.attempts)]
        if am.claim_ver is None:
            with pytest.raises(ConfigError, match="claim"):
                am.obj.checkpointer(background=False)
            return
        if am.ckpt is None:
            am.ckpt = am.obj.checkpointer(background=False)
        step = len(am.steps) + 1
        am.ckpt.save(step, new_shards=[("valid", shard)])  # a zombie's save only writes its own
        event("checkpoint" + (" (zombie)" if am.superseded else ""))
        am.steps.append(step)

    @precondition(lambda self: self.attempts)
    @rule(i=st.integers(0, 63))
    def commit(self, i: int) -> None:
        """Any attempt commits: a live owner, an unclaimed one, or a zombie waking up."""
        am = self.attempts[i % len(self.attempts)]
        self.counter += 1
        payload = f"payload-{self.counter}-{am.run_id}".encode()
        objects = {"data": (payload, "bin")}
        claimed = am.claim_ver is not None
        lands = (am.claim_ver if claimed else am.seen_ver) == self.record_ver
        if not lands:
            self.failed_payloads.add(payload)
            if claimed:  # a superseded claim never commits
                with pytest.raises(LeaseLost, match=f"run {am.run_id} held claim generation"):
                    am.obj.commit_objects(objects, format="bytes", rows=None)
                event("commit: LeaseLost (zombie)")
                return
            if self._reusable_now(am.fingerprint):
                result = am.obj.commit_objects(objects, format="bytes", rows=None)
                assert isinstance(result, Reused), result
                assert self.committed is not None and result.manifest == self.committed.manifest
                am.seen_ver = self.record_ver
                event("commit: Reused (unclaimed)")
                return
            event("commit: CommitConflict (unclaimed)")
            with pytest.raises(CommitConflict, match=f"while run {am.run_id} was writing it"):
                am.obj.commit_objects(objects, format="bytes", rows=None)
            return  # a failed commit changes nothing: retrying it conflicts again
        assert not am.superseded
        result = am.obj.commit_objects(objects, format="bytes", rows=None)
        assert isinstance(result, Committed), result
        event(f"commit: Committed ({'claimed' if claimed else 'unclaimed'})")
        expected_gen = self.gen if claimed else self.gen + 1
        assert result.manifest.generation == expected_gen >= self.gen
        assert result.manifest.run_id == am.run_id
        assert result.manifest.fingerprint == am.fingerprint
        self.gen = expected_gen
        self.record_ver += 1
        self.committed = Version(result.manifest, payload, am.fingerprint)
        am.seen_ver, am.claim_ver = self.record_ver, None
        self._supersede_claims()
        for other in self.attempts:  # a commit clears every attempt's checkpoints
            other.ckpt, other.steps = None, []
        assert self.parts.read(A, P)[1] == payload

    @rule()
    def lookup(self) -> None:
        looked_up_at = time.time()
        found = self.parts.lookup(A, P)
        if self.committed is None:
            assert found is None
            with pytest.raises(PartitionNotCommitted):
                self.parts.read(A, P)
            return
        assert found is not None and found == self.committed.manifest
        self.readers.append(Reader(found, self.committed, looked_up_at))
        event("lookup")

    @precondition(lambda self: self.readers)
    @rule(i=st.integers(0, 63))
    def read_looked_up(self, i: int) -> None:
        """A reader loads a version it looked up earlier: whole bytes or a clear error."""
        reader = self.readers[i % len(self.readers)]
        stored = reader.manifest.object("data")
        assert stored is not None
        version = reader.version
        try:
            data = self.parts.read_object(A, P, stored)
        except CorruptObject as exc:
            assert stored.name in str(exc)
            event(f"reader: CorruptObject ({version.damage or 'collected'})")
            assert version.damage is not None or reader.maybe_collected, str(exc)
            if version.damage is None:
                assert "is missing" in str(exc)
            return
        assert version.damage is None
        event("reader: whole bytes" + (" (superseded)" if version is not self.committed else ""))
        assert data == version.payload
        assert data not in self.failed_payloads

    @rule()
    def read_current(self) -> None:
        c = self.committed
        if c is None:
            with pytest.raises(PartitionNotCommitted):
                self.parts.read(A, P)
            return
        if c.damage is not None:
            stored = c.manifest.object("data")
            assert stored is not None
            with pytest.raises(CorruptObject, match=stored.name):
                self.parts.read(A, P)
            return
        manifest, data = self.parts.read(A, P)
        assert manifest == c.manifest and data == c.payload

    @rule(kind=st.sampled_from(["long", "reader_safe", "zero"]))
    def collect_garbage(self, kind: str) -> None:
        now = time.time()
        live = [r for r in self.readers if not r.maybe_collected]
        if kind == "long":
            grace = 3600.0
        elif kind == "reader_safe":  # just longer than the oldest lookup a reader holds
            oldest = min((r.looked_up_at for r in live), default=now)
            grace = now - oldest + READER_MARGIN_S
        else:
            grace = 0.0
        event(f"gc: {kind}" + (" with readers" if live else ""))
        before = self._folder_names()
        report = PartitionStore(self.store, gc_grace_seconds=grace).collect_garbage()
        after = self._folder_names()
        assert after <= before
        current = {o.name for o in self.committed.manifest.objects} if self.committed else set()
        assert current <= after  # committed data is never collected
        if kind != "zero":
            for reader in live:  # nothing a reader looked up disappears within the grace
                for stored in reader.manifest.objects:
                    assert stored.name in after, (stored.name, grace)
            if kind == "long":
                assert report.objects_removed == 0
                if isinstance(self.store, LocalStore):  # moto dates every upload in 2010
                    assert report.incomplete_removed == 0
            return
        for reader in self.readers:
            if reader.version is not self.committed:
                reader.maybe_collected = True
        # grace 0: only the committed version's objects (and reserved names) remain
        assert {n for n in after if not n.startswith("_")} == current, (after, current)
        assert not set(self.leftovers) & after
        self.leftovers = []
        if isinstance(self.store, LocalStore):
            folder = self.store.root / self.prefix
            if folder.exists():
                assert not [p for p in folder.iterdir() if p.name.startswith(".tmp-")]
        if isinstance(self.store, S3Store):
            ups = self.store.client.list_multipart_uploads(
                Bucket=self.store.bucket, Prefix=self.store._full_prefix(self.prefix))
            assert not ups.get("Uploads"), ups
            self.uploads = []

    @rule(kind=st.sampled_from(["objects", "temp"]))
    def crash(self, kind: str) -> None:
        """An attempt dies after writing its data objects (before the record), or in the
        middle of one write (a ``.tmp-`` file; on S3 an unfinished multipart upload)."""
        name = f"data-crash-{uuid.uuid4().hex}.bin"
        event(f"crash: {kind}")
        if kind == "objects":
            self.store.put(self.prefix + name, b"half-written attempt")
            self.leftovers.append(name)
        elif isinstance(self.store, LocalStore):
            folder = self.store.root / self.prefix
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f".tmp-{uuid.uuid4().hex}-{name}").write_bytes(b"partial")
        else:
            assert isinstance(self.store, S3Store)
            key = self.store._key(self.prefix + name)
            self.store.client.create_multipart_upload(Bucket=self.store.bucket, Key=key)
            self.uploads.append(key)

    @precondition(lambda self: self.committed is not None and self.committed.damage is None)
    @rule(kind=st.sampled_from(["flip", "truncate"]))
    def damage(self, kind: str) -> None:
        """A committed data object changes after commit (bit rot, a hand edit)."""
        assert self.committed is not None
        stored = self.committed.manifest.object("data")
        assert stored is not None
        key = self.prefix + stored.name
        raw = bytearray(self.store.get(key)[0])
        if kind == "flip":
            raw[len(raw) // 2] ^= 0x01
        else:
            del raw[-1]
        self.store.put(key, bytes(raw))
        self.committed.damage = kind
        event(f"damage: {kind}")

    # -- invariants -----------------------------------------------------------------------

    @invariant()
    def store_agrees_with_the_model(self) -> None:
        record, damage = read_record(self.store, self.layout)
        assert damage is None
        if self.record_ver == 0:
            assert record is None
            return
        assert record is not None
        assert record.generation == self.gen
        assert _same(record.manifest, self.committed.manifest if self.committed else None)
        if self.committed is not None:  # a superseded attempt's bytes never got committed
            assert self.committed.payload not in self.failed_payloads

    def teardown(self) -> None:
        for am in self.attempts:
            if am.ckpt is not None:
                am.ckpt.close()


def _run(factory: StoreFactory, ci_examples: int) -> None:
    machine = type("Machine", (AttemptMachine,), {"make_store": staticmethod(factory)})
    run_state_machine_as_test(machine, settings=_settings(ci_examples))


def test_attempts_on_one_partition_local(tmp_path: Path) -> None:
    """On LocalStore, random interleavings of begin/claim/checkpoint/commit (zombies
    included), readers, GC at several graces, crash leftovers and damaged objects keep the
    protocol's promises: readers get a whole committed version or CorruptObject naming
    the damaged/collected object, superseded attempts never commit (LeaseLost), a
    committed fingerprint is reused, claim generations only grow, and GC never removes
    committed data or anything a reader looked up within the grace."""
    _run(lambda: LocalStore(tmp_path / uuid.uuid4().hex), ci_examples=50)


@pytest.mark.s3
def test_attempts_on_one_partition_s3(s3_endpoint: str) -> None:
    """The same machine against a real S3 endpoint (moto server over loopback, If-Match
    and If-None-Match conditional writes, unfinished multipart uploads as crash
    leftovers); one fresh bucket, a fresh prefix per example."""
    bucket = f"t-{uuid.uuid4().hex[:16]}"
    client = s3_client(s3_endpoint)
    client.create_bucket(Bucket=bucket)
    _run(lambda: S3Store(client, bucket, f"sm/{uuid.uuid4().hex}"), ci_examples=20)
