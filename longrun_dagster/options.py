"""``StageOptions``: every plain-valued option of a model stage, declared once.

``model_stage(...)`` takes them as keyword arguments and ``ModelStageComponent`` as
``defs.yaml`` attributes (it inherits this model), both with these defaults, and both check
them here, once, when the stage is defined: ``@model_stage(batch_size=0)`` fails where it
is written, not when its first run starts. The README's options table is
``reference_table()``, and a test keeps the two equal.

Options that are Python objects (``upstream``, ``schema``, ``partitions_def``,
``partition_mapping``, ``setup``, ``retry_policy``, ``backfill_policy``,
``automation_condition``) are ``model_stage`` arguments; the component names them by import
path or template instead.
"""

from collections.abc import Callable
from typing import Annotated, Any

import dagster as dg
import pydantic
from pydantic import Field

from longrun_dagster.errors import ConfigError


def about(text: str) -> dg.Resolver:
    """An option's description for dg, the UI and the README. (Dagster 1.13 drops a
    pydantic ``Field(description=...)`` from the YAML schema of an attribute that has a
    default.)"""
    resolver: dg.Resolver = dg.Resolver.default(description=text)
    return resolver


Problem = Callable[[str, Any, str], ConfigError]
"""``(option, value, fix) -> ConfigError`` worded for whoever declared the stage."""


class StageOptions(dg.Model):
    """The options of a model stage; field order is the README's table order."""

    batch_size: Annotated[int, about("Rows per call of fn; batch boundaries are stable "
                                     "across runs.")] = 256
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
    join_on: Annotated[str | None, about(
        "With several upstreams: the column to join them on (inner join, in the first "
        "upstream's order; rows without a partner are counted as rows_unjoined). Unset: "
        "they must be row-aligned.")] = None
    code_version: Annotated[str | None, about(
        "Unset: a digest of the code of fn and setup (and of the functions of their module "
        "they call), so an edit recomputes. Set it yourself to decide when fn changes "
        "meaning (an edit to an imported helper, a model file).")] = None
    config: Annotated[dict[str, Any], about(
        "Stage settings passed to fn as stage.config; part of the fingerprint, so a change "
        "recomputes.")] = Field(default_factory=dict)
    hook_resource_keys: Annotated[list[str], about(
        "Resources called after every batch, e.g. [gpu, heartbeat] for GpuGuard and "
        "Heartbeat.")] = Field(default_factory=list)
    need_vram_mb: Annotated[int | None, about(
        "GPU memory (MiB) the guard must see free before setup loads the model.")] = None
    oom_retries: Annotated[int, about(
        "Retries in a fresh process after the GPU guard reports memory over its hard "
        "threshold.")] = 2
    sigterm_grace_seconds: Annotated[float, about(
        "On SIGTERM (preemption), time allowed to checkpoint before stopping.")] = 20.0
    time_budget_seconds: Annotated[float | None, about(
        "Per-run time box: checkpoint and end cleanly before this many seconds, so a "
        "continuation run resumes the partition. Unset: no time box.")] = None
    progress_every_seconds: Annotated[float, about(
        "Log progress (rows done of total, rate, ETA) this often.")] = 30.0
    max_partitions_per_run: Annotated[int | None, about(
        "A backfill runs up to this many partitions in one run (each still its own "
        "attempt and commit; the model loads once per run); 0: all in one run. Unset: one "
        "run per partition (or model_stage's backfill_policy).")] = None
    pool: Annotated[str | None, about(
        "Dagster concurrency pool, e.g. gpu (one slot per device) so two runs never share "
        "a GPU.")] = None
    io_manager_key: Annotated[str, about(
        "Resource key of the AtomicObjectStoreIOManager that commits the stage.")] = (
        "io_manager")
    required_resource_keys: Annotated[list[str], about(
        "More resources fn or setup use, as stage.resources.KEY.")] = Field(
        default_factory=list)
    key_prefix: Annotated[list[str], about(
        "Asset key prefix, e.g. [annotation]: the key becomes annotation/NAME.")] = Field(
        default_factory=list)
    group_name: Annotated[str | None, about("Asset group in the Dagster UI.")] = None
    description: Annotated[str | None, about(
        "Asset description; default: the docstring of fn.")] = None
    owners: Annotated[list[str], about(
        "Asset owners: emails or team:name, e.g. [team:ml].")] = Field(default_factory=list)
    kinds: Annotated[list[str], about(
        "Kinds shown on the asset in the UI, e.g. [pytorch].")] = Field(default_factory=list)
    tags: Annotated[dict[str, str], about("Asset tags.")] = Field(default_factory=dict)
    metadata: Annotated[dict[str, Any], about(
        "Definition metadata of the asset, beside the stage's own.")] = Field(
        default_factory=dict)
    op_tags: Annotated[dict[str, Any], about(
        "Tags of the op that computes the asset (executor settings, ...).")] = Field(
        default_factory=dict)

    @pydantic.field_validator("key_prefix", mode="before")
    @classmethod
    def _one_prefix(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @classmethod
    def checked(cls, values: dict[str, Any], problem: Problem) -> "StageOptions":
        """The options, or ``problem(option, value, fix)`` raised for the first wrong one."""
        try:
            options = cls(**values)
        except pydantic.ValidationError as exc:
            first = exc.errors()[0]
            option = ".".join(str(part) for part in first["loc"]) or "options"
            fix = (f"{option!r} is not an option of a model stage; the options are "
                   f"{', '.join(cls.model_fields)}" if first["type"] == "extra_forbidden"
                   else f"{first['msg'].lower()}")
            raise problem(option, first.get("input"), fix) from None
        options.check(problem)
        return options

    def check(self, problem: Problem) -> None:
        """``problem(option, value, fix)`` raised for the first option out of range."""
        rules: list[tuple[str, bool, str]] = [
            ("batch_size", self.batch_size >= 1, "at least 1, e.g. 256"),
            ("checkpoint_every_batches", self.checkpoint_every_batches >= 1,
             "at least 1, e.g. 10"),
            ("checkpoint_every_seconds", self.checkpoint_every_seconds > 0,
             "positive, e.g. 300"),
            ("max_bad_fraction", 0.0 <= self.max_bad_fraction <= 1.0,
             "within 0..1; 0.01 allows 1% invalid rows"),
            ("need_vram_mb", self.need_vram_mb is None or self.need_vram_mb >= 1,
             "a positive number of MiB, or unset"),
            ("oom_retries", self.oom_retries >= 0, "0 or more"),
            ("sigterm_grace_seconds", self.sigterm_grace_seconds >= 0, "0 or more seconds"),
            ("time_budget_seconds",
             self.time_budget_seconds is None or self.time_budget_seconds > 0,
             "positive seconds, or unset"),
            ("progress_every_seconds", self.progress_every_seconds >= 0,
             "0 (every batch) or more seconds, e.g. 30"),
            ("max_partitions_per_run", (self.max_partitions_per_run or 0) >= 0,
             "0 (one run for the whole backfill), a positive number, or unset"),
            ("io_manager_key", bool(self.io_manager_key.strip()),
             "a resource key, e.g. io_manager"),
        ]
        for option, ok, fix in rules:
            if not ok:
                raise problem(option, getattr(self, option), f"it must be {fix}")

    def values(self) -> dict[str, Any]:
        """The options as ``model_stage`` keyword arguments."""
        return {name: getattr(self, name) for name in StageOptions.model_fields}

    def backfill_policy(self) -> dg.BackfillPolicy | None:
        if self.max_partitions_per_run is None:
            return None
        if self.max_partitions_per_run == 0:
            return dg.BackfillPolicy.single_run()
        return dg.BackfillPolicy.multi_run(self.max_partitions_per_run)


class ApiOptions(dg.Model):
    """The options an API stage adds to ``StageOptions`` (``api_stage``); field order is
    the README's table order."""

    kind: Annotated[str, about(
        "chat (/v1/chat/completions) or embeddings (/v1/embeddings).")] = "chat"
    params: Annotated[dict[str, Any], about(
        "Sampling parameters added to every request body (temperature, max_tokens, ...); "
        "part of the fingerprint.")] = Field(default_factory=dict)
    max_in_flight: Annotated[int, about(
        "Requests open at once, over the whole partition (no barrier per batch).")] = 32
    max_retries: Annotated[int, about(
        "Retries of one request after its first try (429, 408, 409, 5xx, timeouts, dropped "
        "connections; never 400 or 422). Spent: the row is quarantined as "
        "retries_exhausted.")] = 6
    retry_base_seconds: Annotated[float, about(
        "First backoff; doubles per retry (up to 30 s), with jitter, never shorter than "
        "the server's Retry-After.")] = 0.5
    outage_seconds: Annotated[float, about(
        "When every request has failed for this long, the attempt ends (ApiOutage) instead "
        "of quarantining rows; a relaunch resumes.")] = 120.0
    price_per_million_tokens: Annotated[dict[str, float] | None, about(
        "US dollars per million tokens, {prompt: 0.15, completion: 0.6}: the "
        "materialization gets counts/cost_usd.")] = None
    max_cost_usd: Annotated[float | None, about(
        "A partition stops before its answers would cost more (CostLimitReached); raise "
        "it and rerun to resume. Needs price_per_million_tokens.")] = None
    endpoint_key: Annotated[str, about(
        "Resource key of the ApiEndpoint (base URL, API key variable, shared rate "
        "limits).")] = "llm"
    mode: Annotated[str, about(
        "stream (requests in flight) or batch: the partition's requests go as one provider "
        "batch (/v1/files, /v1/batches; cheaper, slower); a relaunch reconnects to it.")] = (
        "stream")
    batch_poll_seconds: Annotated[float, about(
        "How often a provider batch is polled (mode batch).")] = 30.0
    batch_completion_window: Annotated[str, about(
        "The provider batch's completion window (mode batch).")] = "24h"

    @classmethod
    def checked(cls, values: dict[str, Any], problem: Problem) -> "ApiOptions":
        try:
            options = cls(**values)
        except pydantic.ValidationError as exc:
            first = exc.errors()[0]
            option = ".".join(str(part) for part in first["loc"]) or "options"
            raise problem(option, first.get("input"), first["msg"].lower()) from None
        prices = options.price_per_million_tokens
        rules: list[tuple[str, bool, str]] = [
            ("kind", options.kind in ("chat", "embeddings"), "chat or embeddings"),
            ("mode", options.mode in ("stream", "batch"), "stream or batch"),
            ("batch_poll_seconds", options.batch_poll_seconds > 0, "positive seconds"),
            ("max_in_flight", options.max_in_flight >= 1, "at least 1, e.g. 32"),
            ("max_retries", options.max_retries >= 0, "0 or more"),
            ("retry_base_seconds", options.retry_base_seconds > 0, "positive seconds"),
            ("outage_seconds", options.outage_seconds > 0, "positive seconds, e.g. 120"),
            ("price_per_million_tokens", prices is None or (
                set(prices) == {"prompt", "completion"} and min(prices.values()) >= 0),
             "{prompt: <USD>, completion: <USD>} per million tokens"),
            ("max_cost_usd", options.max_cost_usd is None or (
                options.max_cost_usd > 0 and prices is not None),
             "positive, with price_per_million_tokens set"),
            ("max_cost_usd", options.max_cost_usd is None or options.mode == "stream",
             "unset with mode batch (a provider batch is submitted whole)"),
        ]
        for option, ok, fix in rules:
            if not ok:
                raise problem(option, getattr(options, option), f"it must be {fix}")
        return options


def description(name: str) -> str:
    """The ``about`` text of option ``name``."""
    fields = {**StageOptions.model_fields, **ApiOptions.model_fields}
    for meta in fields[name].metadata:
        if isinstance(meta, dg.Resolver) and meta.description:
            return str(meta.description)
    raise KeyError(name)


def reference_table(model: type[dg.Model] = StageOptions) -> str:
    """The README's options table of ``model`` (Markdown)."""
    rows = ["| option | default | meaning |", "| --- | --- | --- |"]
    for name, field in model.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = ("required" if field.is_required() else "unset" if default is None
                 else f"`{default!r}`".replace("'", '"'))
        rows.append(f"| `{name}` | {shown} | {description(name)} |")
    return "\n".join(rows)
