"""The rows a stage reads: its upstreams' committed partitions, checked when the run
starts, read, and combined into the one frame the model maps over.

One upstream gives its rows as they are. Several (``upstream={"records": records,
"scores": sentiment}``) are combined by ``combine``: row-aligned (the same rows in the
same order; a column in two of them must hold the same values) or, with ``join_on``,
joined on that column (an inner join in the first upstream's order; rows of the first
that another lacks are counted as ``rows_unjoined``, never silently dropped).
"""

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dagster as dg
import pandas as pd

from longrun_dagster import formats
from longrun_dagster.commit import Manifest, PartitionStore, describe
from longrun_dagster.errors import ConfigError, PartitionNotCommitted
from longrun_dagster.formats import parquet

UpstreamArg = dg.AssetsDefinition | dg.AssetKey | str | Sequence[str]


@dataclass(frozen=True)
class Read:
    """One upstream partition read: which upstream, which partition, its manifest."""

    name: str
    key: dg.AssetKey
    partition: str | None
    manifest: Manifest


def asset_key(upstream: UpstreamArg) -> dg.AssetKey:
    if isinstance(upstream, dg.AssetsDefinition):
        return upstream.key
    if isinstance(upstream, dg.AssetKey):
        return upstream
    if isinstance(upstream, str):
        return dg.AssetKey.from_user_string(upstream)
    return dg.AssetKey(list(upstream))


def named(upstream: UpstreamArg | Mapping[str, UpstreamArg], where: str
          ) -> dict[str, dg.AssetKey]:
    """Each upstream by name: a mapping's names, or the one asset's Python name."""
    if isinstance(upstream, Mapping):
        if not upstream:
            raise ConfigError(f"{where}: upstream = {{}} names no asset; give one asset, or "
                              "a mapping of names to assets such as {'records': records}")
        bad = [n for n in upstream if not isinstance(n, str) or not n.strip()]
        if bad:
            raise ConfigError(f"{where}: upstream names {bad!r} are wrong: each must be a "
                              "non-empty string, e.g. {'records': records}")
        return {name: asset_key(a) for name, a in upstream.items()}
    key = asset_key(upstream)
    return {key.to_python_identifier(): key}


# -- at the start of the run -------------------------------------------------------------


def check(stage: str, own: dg.AssetKey, upstreams: Mapping[str, dg.AssetKey],
          context: dg.AssetExecutionContext, store_class: type) -> None:
    """An upstream that is no asset of this code location, or that another IO manager
    stores, named now (its rows would be "not committed" later, which misleads)."""
    graph = context.job_def.asset_layer.asset_graph
    for key in upstreams.values():
        node = graph.get(key) if graph.has(key) else None
        if node is None or _stub(node):
            known = sorted(k.to_user_string() for k in graph.get_all_asset_keys()
                           if k != own and not _stub(graph.get(k)))
            close = difflib.get_close_matches(key.to_user_string(), known, n=1)
            raise ConfigError(
                f"model stage {stage}: upstream {key.to_user_string()!r} is no asset of this "
                f"code location" + (f"; did you mean {close[0]!r}?" if close else "")
                + f" Its assets: {', '.join(known[:20]) or 'none'}"
                + (f" and {len(known) - 20} more" if len(known) > 20 else ""))
        if not node.is_materializable or node.assets_def is None:
            continue  # an external asset: committed by another code location, or not at all
        io_key = node.assets_def.get_io_manager_key_for_asset_key(key)
        definition = context.job_def.resource_defs.get(io_key)
        cls = getattr(definition, "configurable_resource_cls", None)
        if cls is None or not issubclass(cls, store_class):
            shown = cls.__qualname__ if cls is not None else type(definition).__qualname__
            raise ConfigError(
                f"model stage {stage} reads the committed rows of {key.to_user_string()!r}, "
                f"whose IO manager {io_key!r} is a {shown}, not an "
                f"{store_class.__qualname__}; store that asset with one (its io_manager_key, "
                f"or resources={{{io_key!r}: {store_class.__qualname__}(...)}})")


def _stub(node: Any) -> bool:
    """A key Dagster made up for a dependency no asset defines (a misspelled upstream)."""
    return node.assets_def is not None and bool(node.assets_def.is_auto_created_stub)


def partition_keys(own: dg.AssetKey, key: dg.AssetKey, context: dg.AssetExecutionContext,
                   partition: str | None, *, in_range: bool) -> list[str | None]:
    """The partitions of upstream ``key`` that partition ``partition`` of ``own`` reads."""
    graph = context.job_def.asset_layer.asset_graph
    if graph.get(key).partitions_def is None:
        return [None]
    if in_range:  # this partition's own upstream partitions, through the partition mapping
        mapped = graph.get_parent_partition_keys_for_child(partition, key, own)
        return [*sorted(mapped.partitions_subset.get_partition_keys())]
    return sorted(context.asset_partition_keys_for_input(key.to_python_identifier()))


def manifests(stage: str, own: dg.AssetKey, upstreams: Mapping[str, dg.AssetKey],
              context: dg.AssetExecutionContext, partitions: PartitionStore,
              partition: str | None, *, in_range: bool) -> list[Read]:
    """The committed manifest of every upstream partition this partition reads, in
    upstream order; ``PartitionNotCommitted`` for the first one missing."""
    found = []
    for name, key in upstreams.items():
        for part in partition_keys(own, key, context, partition, in_range=in_range):
            manifest = partitions.lookup(key.path, part)
            if manifest is None:
                where = partitions.uri(key.path, part)
                raise PartitionNotCommitted(
                    f"model stage {stage} needs {describe(key.path, part)}, which is not "
                    f"committed (no manifest at {where}); materialize it first",
                    uri=where, asset=key.to_user_string(), partition=part)
            found.append(Read(name, key, part, manifest))
    return found


# -- reading and combining ------------------------------------------------------------------


def read(stage: str, partitions: PartitionStore, reads: Sequence[Read],
         join_on: str | None) -> tuple[pd.DataFrame, int]:
    """The frame the model maps over, and how many rows of the first upstream found no
    partner in a join (0 without one)."""
    frames: dict[str, list[pd.DataFrame]] = {}
    for r in reads:
        if r.manifest.format not in (parquet.FORMAT, formats.BATCHES_FORMAT) or \
                not r.manifest.objects_of("data"):
            raise ConfigError(
                f"model stage {stage} maps over rows, but {describe(r.key.path, r.partition)}"
                f" is stored as {r.manifest.format!r}; its asset must return a pandas "
                "DataFrame")
        frames.setdefault(r.name, []).append(partitions.load_version(r.manifest))
    whole = {name: _concat(parts) for name, parts in frames.items()}
    if len(whole) == 1:
        return next(iter(whole.values())), 0
    return combine(stage, whole, join_on)


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    if len(frames) == 1:
        return frames[0]
    # an upstream's own index (a doc_id) reaches the model; positions are renumbered
    joined: pd.DataFrame = pd.concat(
        frames, ignore_index=all(isinstance(f.index, pd.RangeIndex) for f in frames))
    return joined


def combine(stage: str, frames: Mapping[str, pd.DataFrame], join_on: str | None
            ) -> tuple[pd.DataFrame, int]:
    """Several upstreams' frames as one (see the module docstring)."""
    if join_on is not None:
        return _joined(stage, frames, join_on)
    names = list(frames)
    first = frames[names[0]]
    for name in names[1:]:
        if len(frames[name]) != len(first):
            raise ConfigError(
                f"model stage {stage}: its upstreams are not row-aligned: {names[0]!r} has "
                f"{len(first)} rows and {name!r} has {len(frames[name])}. Give "
                f"join_on='<column>' (a column every upstream has, such as an id) to join "
                f"them on it")
    out = first.reset_index(drop=True)
    owner = dict.fromkeys(out.columns, names[0])
    for name in names[1:]:
        frame = frames[name].reset_index(drop=True)
        for column in frame.columns:
            if column not in out.columns:
                out[column] = frame[column].to_numpy()
                owner[column] = name
            elif not out[column].equals(frame[column]):
                raise _clash(stage, column, owner[column], name)
    out.index = first.index
    return out, 0


def _joined(stage: str, frames: Mapping[str, pd.DataFrame], key: str
            ) -> tuple[pd.DataFrame, int]:
    names = list(frames)
    for name, frame in frames.items():
        if key not in frame.columns:
            raise ConfigError(
                f"model stage {stage}: join_on={key!r}, but upstream {name!r} has no column "
                f"{key!r}; its columns are {', '.join(map(str, frame.columns))}")
        repeated = frame[key][frame[key].duplicated()].unique()[:3]
        if len(repeated):
            raise ConfigError(
                f"model stage {stage}: join_on={key!r} must identify one row of each "
                f"upstream, but {name!r} repeats {', '.join(map(repr, repeated))}")
    out = frames[names[0]]
    owner = dict.fromkeys(out.columns, names[0])
    for name in names[1:]:
        frame = frames[name]
        for column in frame.columns:
            if column != key and column in owner:
                raise _clash(stage, column, owner[column], name)
        owner.update(dict.fromkeys(frame.columns, name))
        out = out.merge(frame, on=key, how="inner", sort=False)
    first = frames[names[0]]
    unjoined = len(first) - len(out)
    if isinstance(first.index, pd.RangeIndex):
        out.index = pd.RangeIndex(len(out))
    else:
        out.index = first.index[first[key].isin(out[key]).to_numpy()]
    return out, unjoined


def _clash(stage: str, column: object, first: str, second: str) -> ConfigError:
    return ConfigError(
        f"model stage {stage}: column {column!r} is in upstreams {first!r} and {second!r} "
        f"with different values; rename or drop it in one of them (or, if it identifies "
        f"rows, give join_on={column!r})")
