"""Every storage call of one stage attempt, failed in turn: once, then for good.

SQLite's I/O tests fail its N-th file operation for every N and then check the database.
Here the same for a model stage: count the storage calls of one uninterrupted attempt at
a partition (``N_total``); then for every N in 1..N_total, on a fresh base location holding
only the committed upstream, fail call N (once, or it and every later call), and re-run
without faults (three runs in all). The partition must end committed with the baseline's
rows and quarantine, decoded and byte for byte; a run that commits nothing must fail with
the storage error. A wrong commit (rows missing, duplicated or different) never holds.

CI fails every call of a 12-row partition; ``LONGRUN_SLOW=1`` a 24-row one.
"""

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pandas as pd
import pandera.pandas as pa
import pytest

from longrun_dagster import AtomicObjectStoreIOManager, StageContext, model_stage
from longrun_dagster.commit import PartitionStore
from longrun_dagster.storage import LocalStore, ObjectStore, S3Store
from tests.conftest import s3_client
from tests.helpers.faulty_store import INJECTED, Fault, FaultyStore

SLOW = os.environ.get("LONGRUN_SLOW") == "1"
ROWS = 24 if SLOW else 12
BATCH_SIZE = 2
EVERY = 3
RUNS = 3  # the faulted run and at most two clean re-runs
PART = "p1"
PARTS = dg.StaticPartitionsDefinition([PART])
STAGE = ["doubled"]


@dg.asset(partitions_def=PARTS)
def numbers() -> pd.DataFrame:
    return pd.DataFrame({"id": [f"r{i:03d}" for i in range(ROWS)],
                         "x": [float(i) for i in range(ROWS)]})


class Doubled(pa.DataFrameModel):
    id: str = pa.Field(str_length={"min_value": 1})
    value: float = pa.Field(ge=0.0)
    parity: str = pa.Field(isin=["even", "odd"])

    class Config:
        strict = True


def double(batch: pd.DataFrame, stage: StageContext) -> pd.DataFrame:
    """Twice x; rows 5, 13, 21 come out negative and are quarantined."""
    value = (batch.x * 2.0).where(batch.x % 8 != 5, -1.0)
    return pd.DataFrame({"id": batch.id.to_numpy(), "value": value.to_numpy(),
                         "parity": ["even" if x % 2 == 0 else "odd" for x in batch.x]})


doubled = model_stage(upstream=numbers, schema=Doubled, partitions_def=PARTS, name="doubled",
                      batch_size=BATCH_SIZE, checkpoint_every_batches=EVERY,
                      checkpoint_every_seconds=3600, max_bad_fraction=0.25)(double)

STORES: dict[str, FaultyStore] = {}
"""base URI -> the wrapper its IO manager commits through (Dagster builds resources from
config, so the wrapper is found by its URI rather than carried on the instance)."""


class FaultyIOManager(AtomicObjectStoreIOManager):
    """The IO manager, committing through the ``FaultyStore`` registered for its URI."""

    def _build(self) -> PartitionStore:
        return PartitionStore(STORES[self.base_uri or ""],
                              gc_grace_seconds=self.gc_grace_seconds)


@dataclass
class Site:
    """One base location: its real store, the wrapper in front of it, an IO manager."""

    faulty: FaultyStore
    io: FaultyIOManager

    @property
    def real(self) -> ObjectStore:
        return self.faulty.inner


NewSite = Callable[[str], Site]


def site_at(base_uri: str, real: ObjectStore) -> Site:
    STORES[base_uri] = FaultyStore(real)
    return Site(STORES[base_uri], FaultyIOManager(base_uri=base_uri))


@pytest.fixture
def new_site(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NewSite]:
    """Fresh, empty base locations on the backend under test."""
    made: list[str] = []

    def local(name: str) -> Site:
        made.append((tmp_path / name).as_uri())
        return site_at(made[-1], LocalStore(tmp_path / name))

    def s3(name: str) -> Site:
        bucket = request.getfixturevalue("s3_bucket")
        made.append(f"s3://{bucket}/{name}")
        client = s3_client(request.getfixturevalue("s3_endpoint"))
        return site_at(made[-1], S3Store(client, bucket, name))

    yield local if request.param == "local" else s3
    for uri in made:
        STORES.pop(uri, None)


# -- one attempt, and what it committed ----------------------------------------------------


@dataclass(frozen=True)
class Committed:
    """A committed partition of the stage: decoded rows, the content version of its data
    objects (their boundaries follow the checkpoints that landed) and the quarantine's
    raw bytes."""

    rows: pd.DataFrame
    quarantine: pd.DataFrame
    content_version: bytes
    quarantine_bytes: bytes


def committed(store: ObjectStore) -> Committed | None:
    partitions = PartitionStore(store)
    manifest = partitions.lookup(STAGE, PART)
    if manifest is None:
        return None
    _, rows = partitions.load(STAGE, PART)
    quarantine = pd.DataFrame({"row": []})  # a commit without quarantined rows has no object
    if manifest.object("quarantine") is not None:
        _, quarantine = partitions.load(STAGE, PART, role="quarantine")
    return Committed(rows, quarantine, manifest.data_version.encode(),
                     bytes(partitions.read(STAGE, PART, role="quarantine")[1]))


@dataclass(frozen=True)
class Run:
    success: bool
    error: str
    """Every failure of the run, with its causes ("" when it succeeded)."""


def materialize(site: Site, assets: list[dg.AssetsDefinition], instance: dg.DagsterInstance
                ) -> Run:
    result = dg.materialize([numbers, doubled], selection=assets, partition_key=PART,
                            resources={"io_manager": site.io}, instance=instance,
                            raise_on_error=False)
    errors = [e.step_failure_data.error.to_string() for e in result.all_events
              if e.is_step_failure and e.step_failure_data.error is not None]
    errors += [e.message or "" for e in result.all_events if e.is_run_failure]
    return Run(result.success, "\n".join(errors))


def copy_objects(source: ObjectStore, target: ObjectStore) -> None:
    for info in source.list(""):
        target.put(info.key, source.get(info.key)[0])


def describe_rows(want: pd.DataFrame, got: pd.DataFrame, key: str) -> str:
    ids_want = list(want[key]) if key in want else []
    ids_got = list(got[key]) if key in got else []
    missing = sorted(set(ids_want) - set(ids_got))
    extra = sorted(set(ids_got) - set(ids_want))
    twice = sorted({i for i in ids_got if ids_got.count(i) > 1})
    parts = [f"{len(got)} rows, baseline {len(want)}"]
    if missing:
        parts.append(f"missing {missing}")
    if extra:
        parts.append(f"unexpected {extra}")
    if twice:
        parts.append(f"duplicated {twice}")
    if not (missing or extra or twice):
        parts.append(f"same ids, different values or dtypes ({dict(got.dtypes)} vs "
                     f"{dict(want.dtypes)})")
    return "; ".join(parts)


def differences(want: Committed, got: Committed) -> list[str]:
    """How ``got`` differs from the baseline: rows first, then the data's content version
    or the quarantine's bytes alone."""
    found = []
    for name, key, w, g in (("data", "id", want.rows, got.rows),
                            ("quarantine", "row", want.quarantine, got.quarantine)):
        if not (w.equals(g) and list(w.dtypes) == list(g.dtypes)):
            found.append(f"wrong {name} rows: {describe_rows(w, g, key)}")
        elif (want.content_version if name == "data" else want.quarantine_bytes) != (
                got.content_version if name == "data" else got.quarantine_bytes):
            what = "content version" if name == "data" else "bytes"
            found.append(f"{name} rows equal but the {what} differ")
    return found


# -- the enumeration ---------------------------------------------------------------------


@dataclass(frozen=True)
class Violation:
    n: int
    fault: Fault
    call: str
    """The call that was failed, as the faulted run made it."""
    what: str

    def __str__(self) -> str:
        return f"N={self.n} ({self.fault.value}) failing {self.call}: {self.what}"


class Enumeration:
    """The baseline of one backend, and every N failed against it."""

    def __init__(self, new_site: NewSite) -> None:
        self.new_site = new_site
        self.instance = dg.DagsterInstance.ephemeral()
        self.upstream = new_site("upstream")
        assert materialize(self.upstream, [numbers], self.instance).success
        base = self.fresh("baseline")
        assert materialize(base, [doubled], self.instance).success
        self.calls = list(base.faulty.calls)
        baseline = committed(base.real)
        assert baseline is not None
        self.baseline = baseline

    def fresh(self, name: str) -> Site:
        """A new base location with the upstream committed, counting from zero."""
        site = self.new_site(name)
        copy_objects(self.upstream.real, site.real)
        site.faulty.disarm()
        return site

    def fail(self, n: int, fault: Fault) -> list[Violation]:
        site = self.fresh(f"{fault.name.lower()}-{n}")
        site.faulty.arm(n, fault)
        first = materialize(site, [doubled], self.instance)
        made = site.faulty.calls
        call = made[n - 1].shape() if len(made) >= n else "nothing (call N never came)"
        site.faulty.disarm()
        found: list[str] = []
        runs, last = 1, first
        result = committed(site.real)
        if result is None and not first.success:
            if INJECTED not in first.error:
                found.append(f"failed without naming the storage fault: {first.error[-600:]}")
        while result is None and runs < RUNS:
            last = materialize(site, [doubled], self.instance)
            runs += 1
            result = committed(site.real)
        if result is None:
            found.append(f"nothing committed after {runs} runs; last run "
                         f"{'succeeded' if last.success else 'failed: ' + last.error[-600:]}")
        else:
            found += [f"{d} (after {runs} run(s))" for d in differences(self.baseline, result)]
        return [Violation(n, fault, call, what) for what in found]


@pytest.mark.parametrize("fault", [Fault.ONCE, Fault.FOR_GOOD], ids=["once", "for-good"])
@pytest.mark.parametrize("new_site", ["local", pytest.param("s3", marks=pytest.mark.s3)],
                         indirect=True)
def test_every_storage_call_failed_leaves_the_uninterrupted_commit_or_nothing(
    new_site: NewSite, fault: Fault
) -> None:
    """Background checkpointing once followed a failed shard write with a save that
    skipped that write's batches, and a re-run committed 18 of 24 rows without a word."""
    started = time.monotonic()
    run = Enumeration(new_site)
    total = len(run.calls)
    violations = [v for n in range(1, total + 1) for v in run.fail(n, fault)]
    took = time.monotonic() - started
    report = [f"{ROWS} rows, {total} storage calls in the uninterrupted attempt, each failed "
              f"{fault.value}, in {took:.1f}s; {len(violations)} violation(s)",
              *(str(v) for v in violations)]
    print("\n".join(report))
    assert not violations, "\n".join(report)
