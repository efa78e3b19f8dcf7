"""``model_stage``: one decorator that turns a batch model function into a partitioned
Dagster asset that reuses committed work, checkpoints, resumes, and validates its output.

This module is the thin Dagster shell; the loop itself is ``batches.BatchLoop``.
(No ``from __future__ import annotations`` here: Dagster reads the compute function's
annotations at definition time.)
"""

import contextlib
import inspect
import math
import time
import warnings
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
import pandas as pd
import pandera.pandas as pa
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)

from longrun_dagster import dagster_fixes, fingerprint, tags
from longrun_dagster import upstream as upstream_rows
from longrun_dagster.attempt import PartitionAttempt, Reused
from longrun_dagster.batches import BatchLoop, Cadence, Outcome, StageHook
from longrun_dagster.checkpoint import Checkpointer
from longrun_dagster.commit import Manifest, PartitionStore, describe
from longrun_dagster.errors import (
    ConfigError,
    GpuMemoryExceeded,
    SegmentEnded,
    ValidationFailed,
)
from longrun_dagster.io_manager import (
    AtomicObjectStoreIOManager,
    CommittedPartition,
    materialization_metadata,
)
from longrun_dagster.options import StageOptions
from longrun_dagster.resource_config import resource_configs
from longrun_dagster.validation import WRONG_COLUMNS, Schema, as_schema, failure_sample

dagster_fixes.apply()

CHECK_NAME = "schema_valid_rows"
OVERLAP_COMMITS = True
"""A range run commits partition k while it computes k+1 (False: one after the other;
for bench/reuse.py's comparison)."""
STAGE_TAG = "longrun/stage"


@dataclass
class StageContext:
    """What the model function sees besides its batch."""

    asset_key: dg.AssetKey
    partition_key: str | None
    run_id: str
    log: Any
    resources: Any
    config: Mapping[str, Any]
    state: Any = None
    """Whatever ``setup`` returned (a loaded model): built once per run, only when the
    partition is actually computed."""
    batch_index: int = 0
    _counts: dict[str, float] = field(default_factory=dict, repr=False)
    _progressing: Callable[[], None] = field(default=lambda: None, repr=False)

    def still_working(self) -> None:
        """Tell the heartbeat that a long wait inside one batch is making progress (a
        provider batch the server reports in progress, a remote job's advancing counter),
        so the watchdog and the stalled-run sensor do not take it for a hang. Call it only
        on evidence of progress: a hung wait must still read as stalled."""
        self._progressing()

    def count(self, name: str, n: float = 1) -> None:
        """Add ``n`` to counter ``name`` (tokens, retries, HTTP errors) for this batch.
        Counters are checkpointed with their batch, so a resumed partition's totals are
        exact, and they reach the materialization as ``counts/<name>`` (plotted per
        partition in the UI)."""
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"stage.count: the counter's name must be a non-empty string, "
                              f"got {name!r}")
        if isinstance(n, bool) or not isinstance(n, int | float) or not math.isfinite(n):
            raise ConfigError(f"stage.count({name!r}, {n!r}): n must be a finite number")
        self._counts[name] = self._counts.get(name, 0) + n

    def _take_counts(self) -> dict[str, float]:
        taken, self._counts = self._counts, {}
        return taken


ModelFn = Callable[[pd.DataFrame, StageContext], pd.DataFrame]
SetupFn = Callable[[StageContext], Any]


@dataclass(frozen=True)
class StageSpec:
    """Everything ``model_stage`` was told, checked once at definition time."""

    name: str
    key: dg.AssetKey
    upstreams: Mapping[str, dg.AssetKey]
    """Each upstream by name (one: the asset's Python name); read in this order."""
    join_on: str | None
    schema: Any
    batch_size: int
    cadence: Cadence
    max_bad_fraction: float
    code_version: str
    config: Mapping[str, Any]
    setup: SetupFn | None
    io_manager_key: str
    hook_resource_keys: Sequence[str]
    resource_keys: Sequence[str]
    """The resources fn and setup use: their config is in the fingerprint."""
    one_row_per_input: bool
    need_vram_bytes: int | None
    oom_retries: int

    outputs_static: fingerprint.StageStatic = fingerprint.StageStatic("")
    """Everything but the inputs that changes the committed output (see ``fingerprint``)."""
    checkpoint_static: fingerprint.StageStatic = fingerprint.StageStatic("")
    """The same without the bad-row budget, which only judges: raising it after a stage
    failed its budget commits from the finished checkpoint instead of recomputing."""

    @classmethod
    def build(cls, **fields: Any) -> "StageSpec":
        """The spec with its static fingerprint parts; ``ConfigError`` for a config or schema
        that has no canonical encoding, at definition time."""
        common = dict(
            code_version=fields["code_version"], config=fields["config"],
            schema_description=fingerprint.describe_schema(fields["schema"]),
            batch_size=fields["batch_size"], one_row_per_input=fields["one_row_per_input"])
        return cls(**fields,
                   outputs_static=fingerprint.stage_static(
                       **common, max_bad_fraction=fields["max_bad_fraction"]),
                   checkpoint_static=fingerprint.stage_static(**common, max_bad_fraction=0.0))

    def _inputs(self, inputs: Iterable[upstream_rows.Read]) -> list[fingerprint.Input]:
        return [(r.key.to_user_string(), r.partition, r.manifest.data_version)
                for r in inputs]

    def fingerprint(self, inputs: Iterable[upstream_rows.Read],
                    resources: Mapping[str, Any]) -> str:
        """What decides reuse: code version, config, schema, batching, bad-row budget, the
        public config of the resources used and the data versions of the inputs read."""
        return fingerprint.stage_fingerprint_from(self.outputs_static, self._inputs(inputs),
                                                  resources)

    def checkpoint_key(self, inputs: Iterable[upstream_rows.Read],
                       resources: Mapping[str, Any]) -> str:
        """Which checkpoints a computation may resume from."""
        return fingerprint.stage_fingerprint_from(self.checkpoint_static, self._inputs(inputs),
                                                  resources)


def model_stage(
    *,
    upstream: upstream_rows.UpstreamArg | Mapping[str, upstream_rows.UpstreamArg],
    schema: Schema,
    partitions_def: dg.PartitionsDefinition | None = None,
    partition_mapping: dg.PartitionMapping | None = None,
    setup: SetupFn | None = None,
    name: str | None = None,
    retry_policy: dg.RetryPolicy | None = None,
    backfill_policy: dg.BackfillPolicy | None = None,
    automation_condition: dg.AutomationCondition[Any] | None = None,
    # StageOptions (longrun_dagster.options), in its order and with its defaults; a test
    # keeps the two equal
    batch_size: int = 256,
    checkpoint_every_batches: int = 10,
    checkpoint_every_seconds: float = 300.0,
    max_bad_fraction: float = 0.0,
    one_row_per_input: bool = True,
    join_on: str | None = None,
    code_version: str | None = None,
    config: Mapping[str, Any] | None = None,
    hook_resource_keys: Iterable[str] = (),
    need_vram_mb: int | None = None,
    oom_retries: int = 2,
    sigterm_grace_seconds: float = 20.0,
    time_budget_seconds: float | None = None,
    progress_every_seconds: float = 30.0,
    max_partitions_per_run: int | None = None,
    pool: str | None = None,
    io_manager_key: str = "io_manager",
    required_resource_keys: Iterable[str] = (),
    key_prefix: Sequence[str] | str | None = None,
    group_name: str | None = None,
    description: str | None = None,
    owners: Sequence[str] = (),
    kinds: Iterable[str] = (),
    tags: Mapping[str, str] | None = None,
    metadata: Mapping[str, Any] | None = None,
    op_tags: Mapping[str, Any] | None = None,
) -> Callable[[ModelFn], dg.AssetsDefinition]:
    """Decorate ``fn(batch, stage) -> DataFrame`` to make a crash-proof, validated asset.

    The asset reads the committed rows of ``upstream`` for its partition (only when it has
    to compute; several upstreams by name, ``upstream={"records": records, "scores":
    scores}``, are row-aligned or joined on ``join_on``), maps ``fn`` over batches of
    ``batch_size`` rows, validates each output
    with ``schema`` (pandera), checkpoints every ``checkpoint_every_batches`` batches or
    ``checkpoint_every_seconds`` seconds, and commits valid rows (plus a quarantine object
    with invalid rows and their failure cases) through the ``AtomicObjectStoreIOManager``
    under ``io_manager_key``. A partition already committed with the same fingerprint
    (code version, by default a digest of ``fn``'s and ``setup``'s code; config; the
    public config of ``required_resource_keys``; input data versions) is reused without
    calling ``fn``. ``stage.count(name, n)`` inside ``fn`` adds to a per-partition
    counter (``counts/<name>``). More
    than ``max_bad_fraction`` invalid rows fails the partition and commits nothing. With
    ``one_row_per_input`` (default) a batch output of the wrong length quarantines the
    batch's input rows; set it False for stages that filter or expand rows.
    ``setup(stage)`` runs once per computed partition; its result is ``stage.state``.
    Resources under ``hook_resource_keys`` (``GpuGuard``, heartbeat) are called every
    batch; a ``GpuMemoryExceeded`` from them checkpoints and asks Dagster for a retry (up
    to ``oom_retries``; a fresh process under the default multiprocess executor).
    ``need_vram_mb`` is checked by the guard before the first batch.
    With ``backfill_policy=dg.BackfillPolicy.single_run()`` (or ``multi_run(n)``, or
    ``max_partitions_per_run``) a backfill runs a range of partitions in one run: each
    partition is still its own attempt (reuse check, checkpoints, claim, validation,
    budget, commit, and its own materialization), and ``setup`` loads the model once, only
    if one of them computes.

    Every option after ``automation_condition`` is a ``StageOptions`` field (the README's
    options table), checked here: a wrong one raises ``ConfigError`` naming it, its value
    and the fix, where the stage is declared.
    """
    given = locals()
    return declare(given, where=f"model_stage {name!r}" if name else "model_stage")


def declare(given: Mapping[str, Any], *, where: str,
            extra_resource_keys: Iterable[str] = ()) -> Callable[[ModelFn], dg.AssetsDefinition]:
    """The decorator ``model_stage`` (and ``api_stage``) return, from their arguments
    (``given``: every ``StageOptions`` field and the Python-object arguments), checked once.
    ``extra_resource_keys``: resources the stage needs that are not in its fingerprint."""

    def problem(option: str, value: Any, fix: str) -> ConfigError:
        return ConfigError(f"{where}: {option} = {value!r} is wrong: {fix}")

    options = StageOptions.checked(  # None: the option's default
        {k: _plain(given[k]) for k in StageOptions.model_fields if given[k] is not None},
        problem)
    backfill_policy = given["backfill_policy"]
    if backfill_policy is not None and options.max_partitions_per_run is not None:
        raise problem("max_partitions_per_run", options.max_partitions_per_run,
                      "give it or backfill_policy, not both")
    checked_schema = _checked_schema(given["schema"], where)
    upstreams = upstream_rows.named(given["upstream"], where)
    if options.join_on is not None and len(upstreams) < 2:
        raise problem("join_on", options.join_on, "it joins several upstreams; with one "
                      "upstream leave it unset")
    return _decorator(options, upstreams=upstreams, schema=checked_schema,
                      partitions_def=given["partitions_def"],
                      partition_mapping=given["partition_mapping"],
                      setup=given["setup"], name=given["name"],
                      retry_policy=given["retry_policy"],
                      backfill_policy=backfill_policy or options.backfill_policy(),
                      automation_condition=given["automation_condition"],
                      extra_resource_keys=list(extra_resource_keys))


def _plain(value: Any) -> Any:
    """Argument types users pass (tuples, sets, mappings) as StageOptions takes them."""
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, Iterable) and not isinstance(value, str | bytes):
        return list(value)
    return value


def _checked_schema(schema: Any, where: str) -> Any:
    try:
        return as_schema(schema)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _decorator(options: StageOptions, *, upstreams: Mapping[str, dg.AssetKey], schema: Any,
               partitions_def: dg.PartitionsDefinition | None,
               partition_mapping: dg.PartitionMapping | None, setup: SetupFn | None,
               name: str | None, retry_policy: dg.RetryPolicy | None,
               backfill_policy: dg.BackfillPolicy | None,
               automation_condition: dg.AutomationCondition[Any] | None,
               extra_resource_keys: Sequence[str] = ()
               ) -> Callable[[ModelFn], dg.AssetsDefinition]:
    o = options
    cadence = Cadence(o.checkpoint_every_batches, o.checkpoint_every_seconds,
                      o.progress_every_seconds, o.sigterm_grace_seconds,
                      o.time_budget_seconds)

    def decorate(fn: ModelFn) -> dg.AssetsDefinition:
        asset_name = name or fn.__name__
        key = dg.AssetKey([*o.key_prefix, asset_name])
        _refuse_async(fn, setup, asset_name)
        code_version = o.code_version or fingerprint.code_identity(fn, setup)[:16]
        spec = StageSpec.build(
            name=asset_name, key=key, upstreams=upstreams, join_on=o.join_on, schema=schema,
            batch_size=o.batch_size, cadence=cadence, max_bad_fraction=o.max_bad_fraction,
            code_version=code_version, config=dict(o.config), setup=setup,
            io_manager_key=o.io_manager_key, hook_resource_keys=list(o.hook_resource_keys),
            resource_keys=list(o.required_resource_keys),
            one_row_per_input=o.one_row_per_input,
            need_vram_bytes=o.need_vram_mb * 2**20 if o.need_vram_mb else None,
            oom_retries=o.oom_retries,
        )

        def compute(context: dg.AssetExecutionContext) -> Generator[Any, None, None]:
            yield from _execute(spec, fn, context)

        compute.__name__ = asset_name
        return dg.asset(
            name=asset_name, key_prefix=o.key_prefix or None, partitions_def=partitions_def,
            deps=[dg.AssetDep(k, partition_mapping=partition_mapping)
                  for k in upstreams.values()],
            required_resource_keys={o.io_manager_key, *o.required_resource_keys,
                                    *o.hook_resource_keys, *extra_resource_keys},
            io_manager_key=o.io_manager_key, code_version=code_version, pool=o.pool,
            group_name=o.group_name, retry_policy=retry_policy, backfill_policy=backfill_policy,
            automation_condition=automation_condition, owners=o.owners or None,
            kinds=set(o.kinds) or None,
            description=o.description or (fn.__doc__ or "").strip() or None,
            tags={STAGE_TAG: "true", **o.tags}, op_tags=dict(o.op_tags),
            metadata={**o.metadata, "longrun/batch_size": o.batch_size,
                      "longrun/max_bad_fraction": o.max_bad_fraction,
                      "dagster/column_schema": column_schema(schema)},
            check_specs=[_check_spec(key, o.max_bad_fraction, partitions_def)],
        )(compute)

    return decorate


def _check_spec(key: dg.AssetKey, max_bad_fraction: float,
                partitions_def: dg.PartitionsDefinition | None) -> dg.AssetCheckSpec:
    """The schema check, partitioned like its asset: one verdict per partition in the UI."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.PreviewWarning)  # a partitioned check is preview
        return dg.AssetCheckSpec(
            CHECK_NAME, asset=key, blocking=True, partitions_def=partitions_def,
            description=f"at most {max_bad_fraction:.1%} of output rows fail the schema")


def _refuse_async(fn: Any, setup: Any, name: str) -> None:
    for what, f in (("fn", fn), ("setup", setup)):
        if inspect.iscoroutinefunction(f) or inspect.isasyncgenfunction(f):
            raise ConfigError(
                f"model_stage {name!r}: {what} {f.__qualname__} is an async function; a "
                f"model stage calls it synchronously, once per batch. Define it with def "
                f"(inside it, asyncio.run(...) can drive async calls for the batch)")


# -- execution -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Partition:
    """One partition of a run, done: committed by this run or reused."""

    key: str | None
    manifest: Manifest
    reused: bool
    fingerprint: str
    metadata: dict[str, Any]
    """The materialization's metadata (Dagster values)."""
    check: dict[str, Any]
    """The schema check's metadata."""


class StageValidationFailed(ValidationFailed, dg.Failure):
    """A partition over its bad-row budget: a ``dg.Failure`` to Dagster (its metadata shows
    in the UI, downstream does not run) and a ``ValidationFailed`` to whoever catches it
    (``dg.materialize`` raises it as it is)."""

    def __init__(self, message: str, *, metadata: Mapping[str, Any], asset: str,
                 partition: str | None, rows_checked: int, rows_invalid: int,
                 failure_cases: list[dict[str, Any]]) -> None:
        # ValidationFailed's super().__init__ is Failure's (description=message)
        super().__init__(message, asset=asset, partition=partition, rows_checked=rows_checked,
                         rows_invalid=rows_invalid, failure_cases=failure_cases)
        self.metadata = dg.Failure(message, metadata=dict(metadata)).metadata


class _OverBudget(Exception):  # noqa: N818 - internal signal, never escapes _execute
    def __init__(self, check: dg.AssetCheckResult, failure: StageValidationFailed) -> None:
        super().__init__(str(failure))
        self.check, self.failure = check, failure


class _ModelOnce:
    """``setup`` (the model load) at most once per run, only when a partition computes."""

    def __init__(self, setup: SetupFn | None) -> None:
        self.setup, self.loads, self._state, self._loaded = setup, 0, None, False

    def load_into(self, stage: StageContext) -> None:
        if not self._loaded and self.setup is not None:
            self._state = self.setup(stage)
            self._loaded, self.loads = True, self.loads + 1
        stage.state = self._state


def _execute(spec: StageSpec, fn: ModelFn, context: dg.AssetExecutionContext
             ) -> Generator[Any, None, None]:
    """One partition, or each partition of a range run as its own attempt (checkpoints,
    claim, validation, budget, commit), loading the model once for all of them."""
    partitions = _partition_store(spec, context)
    upstream_rows.check(spec.name, spec.key, spec.upstreams, context,
                        AtomicObjectStoreIOManager)
    keys = _run_partition_keys(context)
    model = _ModelOnce(spec.setup)
    resources = resource_configs(context, spec.resource_keys)
    commits = _Commits(context.log, overlap=len(keys) > 1 and OVERLAP_COMMITS)
    try:
        for key in keys:
            try:
                _one_partition(spec, fn, context, partitions, key, model, resources, commits,
                               in_range=len(keys) > 1)
            except _OverBudget as over:
                yield from _report_committed(spec, context, partitions, commits.settle(),
                                             len(keys))
                if len(keys) == 1:
                    yield over.check
                else:
                    yield _evaluation(spec, context, key, over.check)
                    yield from _check_output(spec, context)
                raise over.failure from None
            except BaseException:
                yield from _report_committed(spec, context, partitions, commits.settle(),
                                             len(keys))
                raise
        try:
            done = commits.wait()
        except BaseException:
            yield from _report_committed(spec, context, partitions, commits.done, len(keys))
            raise
    finally:
        commits.close()
    if len(keys) == 1:  # the output first: a verdict is current for the materialization
        [one] = done      # before it, so the UI shows it for that partition
        yield _output(CommittedPartition(one.manifest, reused=one.reused), one.fingerprint,
                      one.metadata)
        yield dg.AssetCheckResult(check_name=CHECK_NAME, passed=True, metadata=one.check)
        return
    reused = sum(d.reused for d in done)
    context.log.info(f"{len(done)} partitions of asset {spec.key.to_user_string()}: {reused} "
                     f"committed already and reused, {len(done) - reused} computed; model "
                     f"loaded {model.loads} time(s)")
    for one in done:
        context.add_asset_metadata(_partition_metadata(partitions, one), partition_key=one.key)
    yield dg.Output({d.key: CommittedPartition(d.manifest, reused=d.reused) for d in done},
                    metadata={"partitions": len(done), "model_loads": model.loads})
    for one in done:
        yield _evaluation(spec, context, one.key, dg.AssetCheckResult(
            check_name=CHECK_NAME, passed=True, metadata=one.check))
    yield from _check_output(spec, context)


def _run_partition_keys(context: dg.AssetExecutionContext) -> list[str | None]:
    if context.has_partition_key:
        return [context.partition_key]
    if context.has_partition_key_range:
        return list(context.partition_keys)
    return [None]


def _partition_metadata(partitions: PartitionStore, one: _Partition) -> dict[str, Any]:
    """What the IO manager records for a partition, plus what the stage measured."""
    return {**materialization_metadata(partitions, one.manifest, reused=one.reused),
            **one.metadata}


def _report_committed(spec: StageSpec, context: dg.AssetExecutionContext,
                      partitions: PartitionStore, done: list[_Partition], total: int
                      ) -> Generator[Any, None, None]:
    """A range run that fails at partition k still reports the partitions it committed
    before k (they stay committed, and a relaunch reuses them)."""
    if total == 1:
        return
    for one in done:
        yield dg.AssetMaterialization(asset_key=spec.key, partition=one.key,
                                      metadata=_partition_metadata(partitions, one))
        yield _evaluation(spec, context, one.key, dg.AssetCheckResult(
            check_name=CHECK_NAME, passed=True, metadata=one.check))


def _check_output(spec: StageSpec, context: dg.AssetExecutionContext
                  ) -> Generator[dg.Output[None], None, None]:
    """The check's (valueless) output, which a range run's per-partition verdicts do not
    give Dagster, when the check is selected."""
    key = dg.AssetCheckKey(spec.key, CHECK_NAME)
    if key in context.assets_def.check_keys:
        name = context.job_def.asset_layer.get_op_output_name(key)
        yield dg.Output(None, output_name=name)


def _evaluation(spec: StageSpec, context: dg.AssetExecutionContext, partition: str | None,
                result: dg.AssetCheckResult) -> dg.AssetCheckEvaluation:
    """A check verdict for one partition of a range run (Dagster gives a check result of
    a range run no partition), aimed at the partition's latest materialization, so the UI
    takes it as that materialization's verdict."""
    latest = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=spec.key, asset_partitions=[partition]),
        limit=1).records if partition is not None else []
    target = AssetCheckEvaluationTargetMaterializationData(
        run_id=latest[0].event_log_entry.run_id, storage_id=latest[0].storage_id,
        timestamp=latest[0].timestamp) if latest else None
    return dg.AssetCheckEvaluation(
        asset_key=spec.key, check_name=CHECK_NAME, passed=result.passed,
        metadata=result.metadata, severity=result.severity, blocking=True,
        partition=partition, target_materialization_data=target)


def _one_partition(spec: StageSpec, fn: ModelFn, context: dg.AssetExecutionContext,
                   partitions: PartitionStore, partition: str | None, model: _ModelOnce,
                   resources: Mapping[str, Any], commits: "_Commits", *, in_range: bool
                   ) -> None:
    started = time.monotonic()
    inputs = upstream_rows.manifests(spec.name, spec.key, spec.upstreams, context,
                                     partitions, partition, in_range=in_range)
    fingerprint = spec.fingerprint(inputs, resources)
    attempt = partitions.begin(spec.key.path, partition, run_id=context.run.run_id,
                               fingerprint=fingerprint, log=context.log)
    reusable = attempt.reusable()
    if reusable is not None:
        return commits.add(_reused(attempt, reusable, context, quiet=in_range))
    if attempt.problems:
        context.log.warning(f"{attempt.describe()} is committed with this fingerprint, but "
                            f"{'; '.join(attempt.problems)}; recomputing it")
    claimed = attempt.claim()
    if isinstance(claimed, Reused):
        return commits.add(_reused(attempt, claimed.manifest, context))
    stage = StageContext(spec.key, partition, context.run.run_id, context.log, context.resources,
                         spec.config)
    _tag_stage_run(context, spec)
    frame, unjoined = upstream_rows.read(spec.name, partitions, inputs, spec.join_on)
    ckpt = attempt.checkpointer(key=spec.checkpoint_key(inputs, resources), log=context.log)
    with _partition_work(fn, frame, stage, attempt) as work:
        outcome = _run_loop(spec, work, stage, frame, ckpt, model, context,
                            attempt.still_holds, claimed.claim.generation,
                            abort=commits.raise_failed)
    meta = _stage_metadata(outcome, time.monotonic() - started)
    if spec.join_on is not None:
        meta["rows_unjoined"] = unjoined
    try:
        check = _judge(spec, meta, partition)
    except BaseException:
        outcome.checkpoint_rest()  # not committed: a rerun resumes from every batch
        raise

    def commit() -> _Partition:
        try:
            result = attempt.commit_batches(
                ckpt, outcome, ledger=outcome.ledger,
                quarantine=outcome.quarantine if outcome.rows_quarantined else None,
                metadata={k: v for k, v in meta.items() if k != "failure_sample"},
                one_row_per_input=spec.one_row_per_input,
            )
        except BaseException:
            outcome.checkpoint_rest()
            raise
        if isinstance(result, Reused):
            return _reused(attempt, result.manifest, context)
        return _Partition(partition, result.manifest, False, fingerprint,
                          _dagster_metadata(meta), check)

    commits.submit(commit)


def _partition_work(fn: ModelFn, frame: pd.DataFrame, stage: StageContext,
                    attempt: PartitionAttempt) -> contextlib.AbstractContextManager[ModelFn]:
    """What computes one partition's batches: ``fn`` itself, or what a stage's work object
    opens for the partition (an API stage's window over all of its rows)."""
    opener = getattr(fn, "open_partition", None)
    if opener is None:
        return contextlib.nullcontext(fn)
    opened: contextlib.AbstractContextManager[ModelFn] = opener(frame, stage, attempt)
    return opened


class _Commits:
    """The partitions of a run, done in order. A range run commits partition k in a
    background thread while partition k+1 computes (the GPU does not wait for k's last
    shard and record); at most one commit is in flight. A failed commit stops the
    partition computing at its next batch (``raise_failed``), which checkpoints it."""

    def __init__(self, log: Any, *, overlap: bool) -> None:
        self.log = log
        self.done: list[_Partition] = []
        self._pool = ThreadPoolExecutor(1, "longrun-commit") if overlap else None
        self._inflight: Future[_Partition] | None = None

    def add(self, one: _Partition) -> None:
        self.wait()
        self.done.append(one)

    def submit(self, commit: Callable[[], _Partition]) -> None:
        self.wait()
        if self._pool is None:
            self.done.append(commit())
        else:
            self._inflight = self._pool.submit(commit)

    def wait(self) -> list[_Partition]:
        """Every partition done, once the commit in flight landed (its error raised)."""
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            self.done.append(inflight.result())
        return self.done

    def raise_failed(self) -> None:
        """At a batch boundary: raise the error of a commit in flight that failed."""
        inflight = self._inflight
        if inflight is not None and inflight.done() and inflight.exception() is not None:
            self.wait()

    def settle(self) -> list[_Partition]:
        """The partitions done, for a run that is failing anyway: a commit in flight is
        waited for; its own failure, if any, is logged (the run's error is another)."""
        try:
            return self.wait()
        except Exception as exc:  # noqa: BLE001 - the error the run fails with matters more
            self.log.error(f"a commit in flight failed as well: {exc}")
            return self.done

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def _tag_stage_run(context: dg.AssetExecutionContext, spec: StageSpec) -> None:
    """Mark the run as computing this stage, for the stalled-run sensor."""
    seen = [a for a in context.run.tags.get(tags.ASSETS, "").split(",") if a]
    try:
        context.instance.add_run_tags(context.run.run_id, {
            tags.STAGE_RUN: "true",
            tags.ASSETS: ",".join(sorted({*seen, spec.key.to_user_string()}))})
    except Exception as exc:  # noqa: BLE001 - advisory: the work matters more than the tag
        context.log.warning(f"could not tag run for the stalled-run sensor: {exc}")


def _partition_store(spec: StageSpec, context: dg.AssetExecutionContext) -> PartitionStore:
    io = getattr(context.resources, spec.io_manager_key)
    if not isinstance(io, AtomicObjectStoreIOManager):
        raise ConfigError(
            f"model stage {spec.name} needs an AtomicObjectStoreIOManager under resource key "
            f"{spec.io_manager_key!r}, got {type(io).__qualname__}; add "
            f"resources={{{spec.io_manager_key!r}: AtomicObjectStoreIOManager(...)}}"
        )
    return io.partition_store()


def _run_loop(spec: StageSpec, fn: ModelFn, stage: StageContext, frame: pd.DataFrame,
              ckpt: Checkpointer, model: _ModelOnce, context: dg.AssetExecutionContext,
              still_holds: Callable[[], bool] | None = None, generation: int = 0,
              abort: Callable[[], None] | None = None) -> Outcome:
    hooks: list[StageHook] = [getattr(context.resources, k) for k in spec.hook_resource_keys]

    def batch_fn(batch: pd.DataFrame, index: int) -> pd.DataFrame:
        stage.batch_index = index
        stage._take_counts()  # a batch that raised counts for nothing  # noqa: SLF001
        return fn(batch, stage)

    def setup() -> None:
        model.load_into(stage)

    def progressing() -> None:
        for hook in hooks:
            waiting = getattr(hook, "on_wait", None)
            if waiting is not None:
                waiting(loop.run_info)

    loop = BatchLoop(batch_fn, frame, batch_size=spec.batch_size, schema=spec.schema,
                     checkpointer=ckpt, cadence=spec.cadence, hooks=hooks,
                     name=f"{spec.name}[{stage.partition_key}]", log=context.log,
                     one_row_per_input=spec.one_row_per_input,
                     need_vram_bytes=spec.need_vram_bytes, asset=spec.key.to_user_string(),
                     setup=setup if spec.setup is not None else None,
                     still_holds=still_holds, generation=generation,
                     counts=stage._take_counts,  # noqa: SLF001
                     final_save=False,  # the commit writes the last batches itself
                     abort=abort)
    stage._progressing = progressing  # noqa: SLF001
    try:
        return loop.run()
    except GpuMemoryExceeded as exc:
        context.log.error(str(exc))
        raise dg.RetryRequested(max_retries=spec.oom_retries, seconds_to_wait=1) from exc
    except SegmentEnded as exc:
        run_id = context.run.run_id
        context.instance.add_run_tags(run_id, {
            tags.CONTINUATION: tags.mark(run_id, "requested"), tags.RUN_ID: run_id})
        raise dg.Failure(description=str(exc), metadata={
            "batches_done": exc.batches_done, "batches_total": exc.batches_total,
            "continuation": "requested",
        }) from exc


def _stage_metadata(outcome: Outcome, wall: float) -> dict[str, Any]:
    rows_out = outcome.ledger.rows_out
    checked = rows_out + outcome.rows_quarantined
    return {
        "rows_in": outcome.rows_in,
        "rows_out": rows_out,
        "rows_quarantined": outcome.rows_quarantined,
        "bad_fraction": _fraction(outcome.rows_quarantined / checked if checked else 0.0),
        "failure_sample": failure_sample(outcome.failure_cases,
                                         quarantine=outcome.quarantine),
        "batches": outcome.batches,
        "model_calls": outcome.model_calls,
        "checkpoints_written": outcome.checkpoints,
        "resumed_from_batch": outcome.resumed_from_batch,
        "wall_seconds": round(wall, 3),
        **{f"counts/{name}": n for name, n in sorted(outcome.counts.items())},
        **outcome.hook_metadata,
    }


def _fraction(x: float) -> float:
    """4 significant digits: 0.0833, not 0.08333333333333333 (and 1e-05 stays)."""
    return float(f"{x:.4g}")


def _dagster_metadata(meta: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in meta.items():
        if k == "failure_sample":
            out[k] = failure_table(v)
        else:
            out[k] = dg.MetadataValue.json(v) if isinstance(v, list | dict) else v
    return out


def column_schema(schema: pa.DataFrameSchema) -> dg.TableSchema:
    """The pandera schema as Dagster's column schema (the UI's Columns tab): each column's
    dtype, nullability, uniqueness, description and checks."""
    columns = []
    for name, column in schema.columns.items():
        checks = [str(check.error or check.name) for check in column.checks]
        columns.append(dg.TableColumn(
            name=str(name), type=str(column.dtype) if column.dtype is not None else "any",
            description=column.description or column.title,
            constraints=dg.TableColumnConstraints(nullable=bool(column.nullable),
                                                  unique=bool(column.unique), other=checks)))
    return dg.TableSchema(columns=columns)


FAILURE_COLUMNS = dg.TableSchema(columns=[
    dg.TableColumn("column", "string"), dg.TableColumn("check", "string"),
    dg.TableColumn("value", "string"), dg.TableColumn("row", "int"),
    dg.TableColumn("row_values", "string", description="the row as the model returned it")])


def failure_table(sample: list[dict[str, Any]]) -> dg.TableMetadataValue:
    """Failure cases as a table the UI renders (values as text: any type can fail)."""
    return dg.MetadataValue.table(schema=FAILURE_COLUMNS, records=[dg.TableRecord({
        "column": None if c["column"] is None else str(c["column"]),
        "check": str(c["check"]), "value": str(c["value"]), "row": c["row"],
        "row_values": str(c.get("row_values", ""))})
        for c in sample])


def _judge(spec: StageSpec, meta: dict[str, Any], partition: str | None) -> dict[str, Any]:
    """The schema check's metadata; past the bad-row budget, ``_OverBudget`` (the
    partition fails: nothing committed, downstream blocked)."""
    check_meta = {k: meta[k] for k in ("rows_out", "rows_quarantined", "bad_fraction")}
    check_meta["failure_sample"] = failure_table(meta["failure_sample"])
    if meta["bad_fraction"] <= spec.max_bad_fraction:
        return check_meta
    check = dg.AssetCheckResult(check_name=CHECK_NAME, passed=False, metadata=check_meta,
                                severity=dg.AssetCheckSeverity.ERROR)
    checked = meta["rows_out"] + meta["rows_quarantined"]
    columns = next((c["value"] for c in meta["failure_sample"]
                    if c["check"] == WRONG_COLUMNS), None)
    if columns is not None:
        raise _OverBudget(check, _failed(spec, meta, partition, checked, (
            f"{describe(spec.key.path, partition)}: the model function returned the wrong "
            f"columns ({columns}); the schema's columns are "
            f"{', '.join(map(repr, map(str, spec.schema.columns)))}. Fix the names fn returns; "
            f"{meta['rows_quarantined']} of {checked} output rows were quarantined for it. "
            "Nothing was committed and downstream stages do not run")))
    first = "; ".join(f"{c['column']}: {c['check']} failed on {c['value']!r}"
                      + (f" (row {c['row']} of the partition's output)"
                         if c["row"] is not None else "")
                      for c in meta["failure_sample"][:3])
    message = (
        f"{describe(spec.key.path, partition)}: {meta['rows_quarantined']} of {checked} output "
        f"rows ({meta['bad_fraction']:.1%}) fail the schema, over the budget of "
        f"{spec.max_bad_fraction:.1%}. First failures: {first}. Nothing was committed and "
        "downstream stages do not run. The model's output is checkpointed, so re-running "
        "unchanged fails the same way: raise max_bad_fraction to commit it from the checkpoint "
        "without calling the model again, or fix the model (an edit to fn, setup or their "
        "config recomputes the partition; with code_version set, change it too)"
    )
    raise _OverBudget(check, _failed(spec, meta, partition, checked, message))


def _failed(spec: StageSpec, meta: dict[str, Any], partition: str | None, checked: int,
            message: str) -> StageValidationFailed:
    return StageValidationFailed(
        message, metadata=_dagster_metadata(meta), asset=spec.key.to_user_string(),
        partition=partition, rows_checked=checked, rows_invalid=meta["rows_quarantined"],
        failure_cases=meta["failure_sample"])


def _reused(attempt: PartitionAttempt, manifest: Manifest, context: dg.AssetExecutionContext,
            *, quiet: bool = False) -> _Partition:
    if not quiet:  # a range run says it once (each log line is an event-log write)
        context.log.info(f"{attempt.describe()} is committed with this fingerprint (run "
                         f"{manifest.run_id}); reusing it, the model is not called")
    # the committing run's figures again (with reused=True and committed_by_run from the
    # IO manager): the UI's per-partition plots show the partition, not this run's zeros
    metadata = _dagster_metadata(manifest.metadata)
    return _Partition(attempt.layout.partition, manifest, True, attempt.fingerprint or "",
                      metadata, {"reused": True,
                                 "rows_quarantined": manifest.metadata.get(
                                     "rows_quarantined", 0)})


def _output(value: Any, fingerprint: str, metadata: Mapping[str, Any]) -> dg.Output[Any]:
    """An Output whose Dagster data version is the fingerprint (same inputs and code, same
    data), so the UI's staleness view agrees with reuse."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)  # Output(data_version=) is beta
        return dg.Output(value, data_version=dg.DataVersion(fingerprint[:24]),
                         metadata=dict(metadata))
