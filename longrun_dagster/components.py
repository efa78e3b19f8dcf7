"""``ModelStageComponent`` and ``ApiStageComponent``: a ``model_stage`` or an ``api_stage``
declared in a ``defs.yaml`` instead of Python.

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
from pydantic import ConfigDict, Field, field_validator

from longrun_dagster.errors import ConfigError
from longrun_dagster.options import ApiOptions, StageOptions, about
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


class StageAttributes(dg.Model):
    """What every stage component names: its asset, input, schema and partitions."""

    name: Annotated[str, about("Asset name (the asset key), e.g. quality.")]
    upstream: Annotated[str | dict[str, str], about(
        "Asset key of the input whose committed rows are read, e.g. embeddings or "
        "raw/records; several: {records: raw/records, scores: sentiment} (with join_on, "
        "or row-aligned).")]
    schema_: Annotated[str, about(
        "Import path of the pandera DataFrameModel or DataFrameSchema every output batch "
        "must satisfy; invalid rows are quarantined.")] = Field(alias="schema")
    partitions: Annotated[str | TimePartitions | StaticPartitions | None, about(
        "Import path of an existing PartitionsDefinition (use the upstream's, so partitions "
        "map one to one), or {type: daily, start_date: 2026-11-01, end_date: ...} (also "
        "hourly, weekly, monthly), or {type: static, partition_keys: [...]}. Unset: "
        "unpartitioned.")] = None
    automation_condition: Annotated[dg.AutomationCondition[Any] | None, dg.Resolver.default(
        model_field_type=str | None,
        description="When Dagster materializes the stage by itself, as a template, e.g. "
                    "\"{{ automation_condition.eager() }}\". Unset: only when launched.",
    )] = None

    model_config = ConfigDict(arbitrary_types_allowed=True)

    def _common(self) -> dict[str, Any]:
        """The Python-object arguments these attributes name, resolved."""
        return {"upstream": self._upstream(), "schema": self._schema(),
                "partitions_def": self._partitions(), "name": self.name,
                "automation_condition": self.automation_condition}

    def _import(self, attribute: str, path: str | None) -> Any:
        return (_import(self.name, attribute, path, callable, "a function", type(self))
                if path else None)

    def _problem(self, attribute: str, value: Any, fix: str) -> ConfigError:
        return _error(type(self).__name__, self.name, attribute, value, fix)

    def _upstream(self) -> dg.AssetKey | dict[str, dg.AssetKey]:
        given = self.upstream if isinstance(self.upstream, dict) else {"": self.upstream}
        if not given or any(not key.strip() for key in given.values()):
            raise _error(type(self).__name__, self.name, "upstream", self.upstream,
                         "give the input's asset key, e.g. embeddings or raw/records")
        keys = {name: dg.AssetKey.from_user_string(key) for name, key in given.items()}
        return keys if isinstance(self.upstream, dict) else keys[""]

    def _schema(self) -> Any:
        found = _import(self.name, "schema", self.schema_, lambda _: True, "a pandera schema",
                        type(self))
        try:
            return as_schema(found)
        except ConfigError:
            raise _error(type(self).__name__, self.name, "schema", self.schema_,
                         f"it names {found!r}, not a pandera DataFrameModel subclass or "
                         "DataFrameSchema; declare one with import pandera.pandas as pa"
                         ) from None

    def _partitions(self) -> dg.PartitionsDefinition | None:
        if self.partitions is None:
            return None
        if isinstance(self.partitions, str):
            found: dg.PartitionsDefinition = _import(
                self.name, "partitions", self.partitions,
                lambda v: isinstance(v, dg.PartitionsDefinition), "a PartitionsDefinition",
                type(self))
            return found
        try:
            return self.partitions.build()
        except Exception as exc:  # noqa: BLE001 - Dagster's own message says what is wrong
            raise _error(type(self).__name__, self.name, "partitions",
                         self.partitions.model_dump(exclude_none=True),
                         f"Dagster rejects it: {exc}") from exc


class ModelStageComponent(dg.Component, dg.Resolvable, StageAttributes, StageOptions):
    """A crash-proof, validated model stage (longrun_dagster.model_stage) from configuration.

    A partitioned asset that maps ``fn`` over batches of the committed rows of
    ``upstream``, validates every output with ``schema``, checkpoints, and reuses
    partitions already committed. Its other attributes are ``StageOptions``, the same
    options ``model_stage`` takes, with the same defaults.
    """

    fn: Annotated[str, about(
        "Import path of the batch function fn(batch: DataFrame, stage: StageContext) -> "
        "DataFrame, e.g. my_project.models.score_quality.")]
    setup: Annotated[str | None, about(
        "Import path of setup(stage) -> state, run once per computed partition (load the "
        "model); its result is stage.state.")] = None

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        return dg.Definitions(assets=[self.build_asset()])

    def build_asset(self) -> dg.AssetsDefinition:
        """The ``model_stage`` asset these attributes describe."""
        self.check(self._problem)
        fn = self._import("fn", self.fn)
        return model_stage(setup=self._import("setup", self.setup), **self._common(),
                           **self.values())(fn)


class ApiStageComponent(dg.Component, dg.Resolvable, StageAttributes, StageOptions,  # type: ignore[misc]
                        ApiOptions):
    """A stage that calls a model behind an OpenAI-compatible endpoint
    (longrun_dagster.api_stage) from configuration: ``request`` builds each row's request
    body, ``parse`` turns the answer into the output row. Its other attributes are
    ``ApiOptions`` and ``StageOptions``, as ``api_stage`` takes them."""

    model_name: Annotated[str, about(
        "The model the endpoint serves (api_stage's model), sent with every request; part "
        "of the fingerprint and of each request's key.")]
    request: Annotated[str, about(
        "Import path of request(row: dict, stage) -> request body (dict) or prompt (str), "
        "e.g. my_project.llm.ask.")]
    parse: Annotated[str | None, about(
        "Import path of parse(answer: Answer, row: dict, stage) -> output row(s). Unset: "
        "the response model's fields, {text: ...} or {embedding: ...}.")] = None
    response_model: Annotated[str | None, about(
        "Import path of a pydantic model the answer's JSON must fit (sent as "
        "response_format; a misfit is quarantined as schema_mismatch).")] = None

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        return dg.Definitions(assets=[self.build_asset()])

    def build_asset(self) -> dg.AssetsDefinition:
        """The ``api_stage`` asset these attributes describe."""
        from longrun_dagster.api.stage import api_stage

        self.check(self._problem)
        response_model = (_import(self.name, "response_model", self.response_model,
                                  lambda v: isinstance(v, type), "a pydantic model",
                                  type(self)) if self.response_model else None)
        options = {**self.values(), **{k: getattr(self, k) for k in ApiOptions.model_fields}}
        return api_stage(model=self.model_name, parse=self._import("parse", self.parse),
                         response_model=response_model, **self._common(), **options
                         )(self._import("request", self.request))

def _import(stage: str, attribute: str, path: str, accept: Callable[[Any], bool],
            kind: str, component: type) -> Any:
    """The object at ``package.module.name`` (or ``package.module:name``)."""
    module_name, sep, name = path.replace(":", ".").rpartition(".")
    if not sep or not module_name or not name:
        raise _error(component.__name__, stage, attribute, path,
                     f"give the import path of {kind} as package.module.name")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise _error(component.__name__, stage, attribute, path,
                     f"module {module_name} does not import ({exc}); check the spelling and "
                     "that its package is installed or on sys.path") from exc
    if not hasattr(module, name):
        raise _error(component.__name__, stage, attribute, path,
                     f"module {module_name} has no attribute {name!r}; check the spelling")
    found = getattr(module, name)
    if not accept(found):
        raise _error(component.__name__, stage, attribute, path,
                     f"it names {found!r}, which is not {kind}")
    return found


def _error(component: str, stage: str, attribute: str, value: Any, fix: str) -> ConfigError:
    return ConfigError(f"{component} {stage!r}: attribute {attribute} = {value!r} is "
                       f"wrong: {fix}")
