"""``ModelStageComponent``: a ``model_stage`` declared in a ``defs.yaml`` instead of Python.

    type: longrun_dagster.components.ModelStageComponent
    attributes:
      name: quality
      fn: definitions.assets.score_quality
      upstream: embeddings
      schema: definitions.assets.Scored
      partitions: definitions.assets.DAYS

Registered through the ``dagster_dg_cli.registry_modules`` entry point, so ``dg list
components`` shows it and ``dg check defs`` validates its YAML. Attributes are plain values
(import paths, numbers); they are resolved and checked in ``build_defs``, and a bad one
raises ``ConfigError`` naming the attribute, the value and the fix.
"""

import datetime
import importlib
from collections.abc import Callable
from typing import Annotated, Any, Literal

import dagster as dg
from pydantic import Field, field_validator

from longrun_dagster.errors import ConfigError
from longrun_dagster.stage import model_stage
from longrun_dagster.validation import as_schema

TIME_PARTITIONS: dict[str, Callable[..., dg.PartitionsDefinition]] = {
    "hourly": dg.HourlyPartitionsDefinition,
    "daily": dg.DailyPartitionsDefinition,
    "weekly": dg.WeeklyPartitionsDefinition,
    "monthly": dg.MonthlyPartitionsDefinition,
}


class TimePartitions(dg.Model):
    """One partition per hour, day, week or month from ``start_date``."""

    type: Literal["hourly", "daily", "weekly", "monthly"] = Field(
        default="daily", description="Partition length: hourly, daily, weekly or monthly.")
    start_date: str = Field(description="First partition, e.g. 2026-11-01.")
    end_date: str | None = Field(
        default=None, description="End (exclusive); unset: partitions keep coming up to now.")
    timezone: str | None = Field(default=None, description="IANA timezone; default UTC.")

    @field_validator("start_date", "end_date", mode="before")
    @classmethod
    def _iso(cls, value: Any) -> Any:
        # YAML reads an unquoted 2026-11-01 as a date, not a string
        return value.isoformat() if isinstance(value, datetime.date) else value

    def build(self) -> dg.PartitionsDefinition:
        return TIME_PARTITIONS[self.type](start_date=self.start_date, end_date=self.end_date,
                                          timezone=self.timezone)


class StaticPartitions(dg.Model):
    """A fixed list of partition keys."""

    type: Literal["static"] = Field(description="static: the keys below, nothing else.")
    partition_keys: list[str] = Field(description="The partition keys, e.g. [en, de, fr].")

    def build(self) -> dg.PartitionsDefinition:
        return dg.StaticPartitionsDefinition(self.partition_keys)


def about(text: str) -> dg.Resolver:
    """An attribute's description for dg and the UI. (Dagster 1.13 drops a pydantic
    ``Field(description=...)`` from the YAML schema of an attribute that has a default.)"""
    resolver: dg.Resolver = dg.Resolver.default(description=text)
    return resolver


class ModelStageComponent(dg.Component, dg.Resolvable, dg.Model):
    """A crash-proof, validated model stage (longrun_dagster.model_stage) from configuration.

    A partitioned asset that maps ``fn`` over batches of the committed rows of
    ``upstream``, validates every output with ``schema``, checkpoints, and reuses
    partitions already committed.
    """

    name: Annotated[str, about("Asset name (the asset key), e.g. quality.")]
    fn: Annotated[str, about(
        "Import path of the batch function fn(batch: DataFrame, stage: StageContext) -> "
        "DataFrame, e.g. my_project.models.score_quality.")]
    upstream: Annotated[str, about(
        "Asset key of the input whose committed rows are read, e.g. embeddings or "
        "raw/records.")]
    schema_: Annotated[str, about(
        "Import path of the pandera DataFrameModel or DataFrameSchema every output batch "
        "must satisfy; invalid rows are quarantined.")] = Field(alias="schema")
    setup: Annotated[str | None, about(
        "Import path of setup(stage) -> state, run once per computed partition (load the "
        "model); its result is stage.state.")] = None
    partitions: Annotated[str | TimePartitions | StaticPartitions | None, about(
        "Import path of an existing PartitionsDefinition (use the upstream's, so partitions "
        "map one to one), or {type: daily, start_date: 2026-11-01, end_date: ...} (also "
        "hourly, weekly, monthly), or {type: static, partition_keys: [...]}. Unset: "
        "unpartitioned.")] = None
    batch_size: Annotated[int, about("Rows per call of fn.")] = 256
    checkpoint_every_batches: Annotated[int, about(
        "Save progress after this many batches (or checkpoint_every_seconds, whichever "
        "comes first).")] = 10
    checkpoint_every_seconds: Annotated[float, about(
        "Save progress after this many seconds.")] = 300.0
    max_bad_fraction: Annotated[float, about(
        "Fraction of output rows (0..1) that may fail the schema and be quarantined; past "
        "it the partition fails and nothing is committed.")] = 0.0
    one_row_per_input: Annotated[bool, about(
        "fn returns one row per input row; a batch of the wrong length is quarantined. "
        "Set false for stages that filter or expand rows.")] = True
    code_version: Annotated[str, about(
        "Bump it when fn changes meaning: committed partitions of another code version are "
        "recomputed.")] = "1"
    config: Annotated[dict[str, Any], about(
        "Stage settings passed to fn as stage.config; part of the fingerprint, so a change "
        "recomputes.")] = Field(default_factory=dict)
    hook_resource_keys: Annotated[list[str], about(
        "Resources called after every batch, e.g. [gpu, heartbeat] for GpuGuard and "
        "Heartbeat.")] = Field(default_factory=list)
    pool: Annotated[str | None, about(
        "Dagster concurrency pool, e.g. gpu (one slot per device) so two runs never share "
        "a GPU.")] = None
    group_name: Annotated[str | None, about("Asset group in the Dagster UI.")] = None
    description: Annotated[str | None, about(
        "Asset description; default: the docstring of fn.")] = None
    tags: Annotated[dict[str, str], about("Asset tags.")] = Field(default_factory=dict)
    op_tags: Annotated[dict[str, Any], about(
        "Tags of the op that computes the asset (executor settings, ...).")] = Field(
        default_factory=dict)
    need_vram_mb: Annotated[int | None, about(
        "GPU memory (MiB) the guard must see free before the first batch.")] = None
    oom_retries: Annotated[int, about(
        "Retries in a fresh process after the GPU guard reports memory over its hard "
        "threshold.")] = 2
    sigterm_grace_seconds: Annotated[float, about(
        "On SIGTERM (preemption), time allowed to checkpoint before stopping.")] = 20.0
    time_budget_seconds: Annotated[float | None, about(
        "Per-run time box: checkpoint and end cleanly before this many seconds, so a "
        "continuation run resumes the partition. Unset: no time box.")] = None
    max_partitions_per_run: Annotated[int | None, about(
        "A backfill runs up to this many partitions in one run (each still its own "
        "attempt and commit; the model loads once per run); 0: all in one run. Unset: one "
        "run per partition.")] = None

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        return dg.Definitions(assets=[self.build_asset()])

    def build_asset(self) -> dg.AssetsDefinition:
        """The ``model_stage`` asset these attributes describe."""
        self._check_numbers()
        fn = _import(self.name, "fn", self.fn, callable, "a function")
        setup = (_import(self.name, "setup", self.setup, callable, "a function")
                 if self.setup else None)
        return model_stage(
            upstream=self._upstream(), schema=self._schema(), partitions_def=self._partitions(),
            batch_size=self.batch_size, checkpoint_every_batches=self.checkpoint_every_batches,
            checkpoint_every_seconds=self.checkpoint_every_seconds,
            max_bad_fraction=self.max_bad_fraction, one_row_per_input=self.one_row_per_input,
            need_vram_mb=self.need_vram_mb, oom_retries=self.oom_retries,
            code_version=self.code_version, config=self.config, setup=setup, name=self.name,
            group_name=self.group_name, description=self.description, pool=self.pool,
            hook_resource_keys=self.hook_resource_keys,
            sigterm_grace_seconds=self.sigterm_grace_seconds,
            time_budget_seconds=self.time_budget_seconds, tags=self.tags, op_tags=self.op_tags,
            backfill_policy=self._backfill_policy(),
        )(fn)

    def _backfill_policy(self) -> dg.BackfillPolicy | None:
        if self.max_partitions_per_run is None:
            return None
        if self.max_partitions_per_run == 0:
            return dg.BackfillPolicy.single_run()
        return dg.BackfillPolicy.multi_run(self.max_partitions_per_run)

    def _check_numbers(self) -> None:
        rules: list[tuple[str, float | None, bool, str]] = [
            ("batch_size", self.batch_size, self.batch_size >= 1, "at least 1, e.g. 256"),
            ("checkpoint_every_batches", self.checkpoint_every_batches,
             self.checkpoint_every_batches >= 1, "at least 1, e.g. 10"),
            ("checkpoint_every_seconds", self.checkpoint_every_seconds,
             self.checkpoint_every_seconds > 0, "positive, e.g. 300"),
            ("max_bad_fraction", self.max_bad_fraction, 0.0 <= self.max_bad_fraction <= 1.0,
             "within 0..1; 0.01 allows 1% invalid rows"),
            ("need_vram_mb", self.need_vram_mb, (self.need_vram_mb or 1) >= 1,
             "a positive number of MiB, or unset"),
            ("max_partitions_per_run", self.max_partitions_per_run,
             (self.max_partitions_per_run or 0) >= 0,
             "0 (one run for the whole backfill), a positive number, or unset"),
            ("oom_retries", self.oom_retries, self.oom_retries >= 0, "0 or more"),
            ("sigterm_grace_seconds", self.sigterm_grace_seconds,
             self.sigterm_grace_seconds >= 0, "0 or more seconds"),
            ("time_budget_seconds", self.time_budget_seconds,
             (self.time_budget_seconds or 1) > 0, "positive seconds, or unset"),
        ]
        for attribute, value, ok, fix in rules:
            if not ok:
                raise _error(self.name, attribute, value, f"it must be {fix}")

    def _upstream(self) -> dg.AssetKey:
        if not self.upstream.strip():
            raise _error(self.name, "upstream", self.upstream,
                         "give the input's asset key, e.g. embeddings or raw/records")
        return dg.AssetKey.from_user_string(self.upstream)

    def _schema(self) -> Any:
        found = _import(self.name, "schema", self.schema_, lambda _: True, "a pandera schema")
        try:
            return as_schema(found)
        except TypeError:
            raise _error(self.name, "schema", self.schema_,
                         f"it names {found!r}, not a pandera DataFrameModel subclass or "
                         "DataFrameSchema; declare one with import pandera.pandas as pa"
                         ) from None

    def _partitions(self) -> dg.PartitionsDefinition | None:
        if self.partitions is None:
            return None
        if isinstance(self.partitions, str):
            found: dg.PartitionsDefinition = _import(
                self.name, "partitions", self.partitions,
                lambda v: isinstance(v, dg.PartitionsDefinition), "a PartitionsDefinition")
            return found
        try:
            return self.partitions.build()
        except Exception as exc:  # noqa: BLE001 - Dagster's own message says what is wrong
            raise _error(self.name, "partitions", self.partitions.model_dump(exclude_none=True),
                         f"Dagster rejects it: {exc}") from exc


def _import(stage: str, attribute: str, path: str, accept: Callable[[Any], bool],
            kind: str) -> Any:
    """The object at ``package.module.name`` (or ``package.module:name``)."""
    module_name, sep, name = path.replace(":", ".").rpartition(".")
    if not sep or not module_name or not name:
        raise _error(stage, attribute, path,
                     f"give the import path of {kind} as package.module.name")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise _error(stage, attribute, path,
                     f"module {module_name} does not import ({exc}); check the spelling and "
                     "that its package is installed or on sys.path") from exc
    if not hasattr(module, name):
        raise _error(stage, attribute, path,
                     f"module {module_name} has no attribute {name!r}; check the spelling")
    found = getattr(module, name)
    if not accept(found):
        raise _error(stage, attribute, path,
                     f"it names {found!r}, which is not {kind}")
    return found


def _error(stage: str, attribute: str, value: Any, fix: str) -> ConfigError:
    return ConfigError(f"ModelStageComponent {stage!r}: attribute {attribute} = {value!r} is "
                       f"wrong: {fix}")
