"""The config of the resources a stage uses, as its fingerprint sees it: what changes the
output (a model name, a temperature), not where secrets come from.

A resource's config in a run is the run config's (``--config-json``, the launchpad) when
given, else the one it was declared with. Values read from the environment
(``dg.EnvVar``, ``{"env": NAME}``) and fields named like secrets (``api_key``, ``token``,
``password``) are left out: a rotated API key must not recompute every partition.
"""

import re
from collections.abc import Iterable, Mapping
from typing import Any

import dagster as dg

SECRET_NAME = re.compile(
    r"(^|_)(api_?key|access_?key|secret|secret_?key|token|password|passwd|credentials?|auth)"
    r"($|_)", re.IGNORECASE)


def resource_configs(context: dg.AssetExecutionContext, keys: Iterable[str]
                     ) -> dict[str, Any]:
    """Each resource's public config in this run, by key (``{}`` for one with none)."""
    return {key: public(_resolved(context, key), _raw(context, key)) for key in sorted(keys)}


def public(resolved: Any, raw: Any) -> Any:
    """``resolved`` without the values ``raw`` (the config as written) reads from the
    environment and without fields named like secrets."""
    if not isinstance(resolved, Mapping):
        return None if _from_env(raw) else resolved
    written = raw if isinstance(raw, Mapping) else {}
    return {name: public(value, written.get(name)) for name, value in resolved.items()
            if not SECRET_NAME.search(str(name)) and not _from_env(written.get(name))}


def _from_env(raw: Any) -> bool:
    return isinstance(raw, Mapping) and set(raw) == {"env"}


def _resolved(context: dg.AssetExecutionContext, key: str) -> Any:
    step = context.op_execution_context._step_execution_context  # noqa: SLF001 - the only
    resource = step.resolved_run_config.resources.get(key)         # place it is resolved
    return None if resource is None else resource.config


def _raw(context: dg.AssetExecutionContext, key: str) -> Any:
    resources = context.run.run_config.get("resources")
    given = resources.get(key) if isinstance(resources, Mapping) else None
    if isinstance(given, Mapping) and "config" in given:
        return given["config"]
    definition = context.job_def.resource_defs.get(key)
    schema = getattr(definition, "config_schema", None)
    field = schema.as_field() if schema is not None else None
    return field.default_value if field is not None and field.default_provided else None
