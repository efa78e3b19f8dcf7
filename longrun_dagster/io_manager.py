"""AtomicObjectStoreIOManager: Dagster's IO manager interface over the commit protocol."""

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
from pydantic import Field, PrivateAttr

from longrun_dagster.attempt import Reused
from longrun_dagster.commit import Manifest, PartitionStore
from longrun_dagster.errors import ConfigError, PartitionNotCommitted
from longrun_dagster.formats import parquet
from longrun_dagster.storage import open_store
from longrun_dagster.validation import quarantine_rows

BASE_URI_ENV = "LONGRUN_BASE_URI"

try:  # the s3 extra; without it the IO manager has no s3 field and stores locally
    from dagster_aws.s3 import S3Resource
except ImportError:  # pragma: no cover - tested in a subprocess that blocks the import
    S3Resource = None  # type: ignore[misc, assignment]


@dataclass(frozen=True)
class CommittedPartition:
    """Output of a model stage: the partition is committed already (by the stage's own
    attempt, or reused); the IO manager records it and writes nothing."""

    manifest: Manifest
    reused: bool


def default_base_uri() -> str:
    """``$LONGRUN_BASE_URI``, else ``$DAGSTER_HOME/longrun``, else ``./.longrun/storage``."""
    if os.environ.get(BASE_URI_ENV):
        return os.environ[BASE_URI_ENV]
    home = os.environ.get("DAGSTER_HOME")
    base = Path(home) / "longrun" if home else Path.cwd() / ".longrun" / "storage"
    return base.absolute().as_uri()


def materialization_metadata(
    store: PartitionStore, manifest: Manifest, *, reused: bool
) -> dict[str, Any]:
    """What every materialization records about the partition it committed or reused."""
    objects = manifest.objects_of("data")
    data = objects[0] if len(objects) == 1 else None  # several: the content version says
    uri = store.uri(manifest.asset, manifest.partition)
    meta: dict[str, Any] = {
        "dagster/uri": dg.MetadataValue.path(uri),
        "uri": dg.MetadataValue.path(uri),
        "bytes": manifest.size,
        "format": manifest.format,
        "data_objects": len(objects),
        "digest": data.digest if data else "",
        "digest_algorithm": data.algorithm if data else "",
        "reused": reused,
        "committed_by_run": manifest.run_id,
        # not "data_version": the UI already shows Dagster's data version (the fingerprint)
        "content_version": manifest.data_version,
    }
    if manifest.rows is not None:
        meta["dagster/row_count"] = manifest.rows
        meta["rows"] = manifest.rows
    if manifest.fingerprint:
        meta["fingerprint"] = manifest.fingerprint
    quarantine = manifest.object("quarantine")
    if quarantine is not None:  # read it with AtomicObjectStoreIOManager.load_quarantine
        meta["quarantine_uri"] = dg.MetadataValue.path(
            store.store.uri_of(store.prefix(manifest.asset, manifest.partition)
                               + quarantine.name))
    return meta


class AtomicObjectStoreIOManager(dg.ConfigurableIOManager):
    """Commits each partition atomically with checksums to a local path or S3; no pickle.

    DataFrames are stored as Parquet, dicts of tensors as safetensors, JSON-able values as
    JSON. A downstream asset reading several upstream partitions gets a dict
    ``{partition_key: value}``. Readers trust only verified manifests, so a torn or
    tampered object is reported, never read.
    """

    base_uri: str | None = Field(
        default=None,
        description=(
            "Where partitions are committed: file:///abs/path, a local path, or "
            "s3://bucket/prefix. Default: $LONGRUN_BASE_URI, else $DAGSTER_HOME/longrun, "
            "else ./.longrun/storage."
        ),
    )
    if S3Resource is not None:
        s3: S3Resource | None = Field(
            default=None,
            description=(
                "dagster-aws S3Resource for s3:// URIs (endpoint, region, credentials, "
                "retries). Unset: boto3's defaults from the environment."
            ),
        )
    gc_grace_seconds: float = Field(
        default=3600.0,
        description=(
            "After a commit, objects in that partition's folder that no committed version "
            "has named for this long are deleted: a reader of a replaced version gets this "
            "long, counted from its replacement, to finish reading it."
        ),
    )

    _partitions: PartitionStore | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._partitions = self._build()

    def _build(self) -> PartitionStore:
        uri = self.base_uri or default_base_uri()
        s3 = getattr(self, "s3", None)
        client = s3.get_client() if s3 is not None and uri.startswith("s3:") else None
        return PartitionStore(open_store(uri, s3_client=client),
                              gc_grace_seconds=self.gc_grace_seconds)

    def load_quarantine(self, asset: "dg.AssetsDefinition | dg.AssetKey | str",
                        partition: str | None = None) -> pd.DataFrame:
        """The rows a stage quarantined in its committed ``partition``: one row each,
        indexed by its row number in the stage's output, with its values (the columns the
        model returned) and ``failures``, a list of ``{"column", "check", "value"}``. No
        bad rows: an empty frame. ``PartitionNotCommitted`` if nothing is committed."""
        key = (asset.key if isinstance(asset, dg.AssetsDefinition)
               else asset if isinstance(asset, dg.AssetKey)
               else dg.AssetKey.from_user_string(asset))
        store = self.partition_store()
        manifest = store.committed(key.path, partition)
        stored = manifest.object("quarantine")
        raw = None if stored is None else store.read_object(
            key.path, partition, stored, decode=parquet.loads)
        return quarantine_rows(raw)

    def partition_store(self) -> PartitionStore:
        """The plain commit-protocol object this IO manager writes through."""
        if self._partitions is None:
            self._partitions = self._build()
        return self._partitions

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        keys = _partition_keys(context)
        if len(keys) > 1:
            values = _per_partition(obj, keys, context)
        else:
            values = {keys[0]: obj}
        metas = [self._handle_one(context, key, value) for key, value in values.items()]
        if len(metas) == 1:
            context.add_output_metadata(metas[0])
        else:
            context.add_output_metadata({
                "partitions": len(metas),
                "bytes": sum(m["bytes"] for m in metas),
                "rows": sum(m.get("rows", 0) for m in metas),
                "reused": sum(1 for m in metas if m["reused"]),
            })

    def _handle_one(self, context: dg.OutputContext, key: str | None, obj: Any) -> dict[str, Any]:
        store = self.partition_store()
        if isinstance(obj, CommittedPartition):
            return materialization_metadata(store, obj.manifest, reused=obj.reused)
        attempt = store.begin(list(context.asset_key.path), key, run_id=context.run_id,
                              log=context.log)
        result = attempt.commit(obj)
        context.log.debug(f"committed {attempt.describe()} at {attempt.uri}")
        return materialization_metadata(store, result.manifest,
                                        reused=isinstance(result, Reused))

    def load_input(self, context: dg.InputContext) -> Any:
        store = self.partition_store()
        asset = list(context.asset_key.path)
        keys = _partition_keys(context)
        meta = context.definition_metadata or {}
        allow_missing = bool(meta.get("allow_missing_partitions", False))
        loaded: dict[str | None, Any] = {}
        for key in keys:
            try:
                loaded[key] = store.load(asset, key)[1]
            except PartitionNotCommitted:
                if allow_missing:
                    continue
                raise
        if len(keys) == 1 and not meta.get("as_dict", False):
            return loaded[keys[0]]
        return loaded


def _partition_keys(context: dg.OutputContext | dg.InputContext) -> list[str | None]:
    if context.has_asset_partitions:
        return list(context.asset_partition_keys)
    return [None]


def _per_partition(obj: Any, keys: list[str | None], context: dg.OutputContext) -> dict[
    str | None, Any
]:
    if isinstance(obj, CommittedPartition):
        raise ConfigError("CommittedPartition covers one partition; return one per partition")
    if not isinstance(obj, Mapping) or set(obj) != set(keys):
        raise ConfigError(
            f"asset {context.asset_key.to_user_string()} ran for {len(keys)} partitions in "
            f"one run ({keys[0]} .. {keys[-1]}), so its output must be a dict "
            "{partition_key: value} with exactly those keys; got "
            f"{type(obj).__qualname__}. Return such a dict, or launch one run per partition"
        )
    return dict(obj)


def garbage_collection_job(name: str = "longrun_garbage_collection",
                           io_manager_key: str = "io_manager") -> dg.JobDefinition:
    """A job that collects garbage in every partition folder of the store behind
    ``io_manager_key``: objects no committed version has named for ``gc_grace_seconds``
    (failed or superseded attempts, replaced versions) and leftovers of interrupted writes
    (temp files, unfinished multipart uploads). A commit collects its own partition's
    folder; schedule this job (e.g. daily) for what crashes leave elsewhere."""

    @dg.op(name=f"{name}_op", required_resource_keys={io_manager_key})
    def collect(context: dg.OpExecutionContext) -> dg.Output[None]:
        io = getattr(context.resources, io_manager_key)
        if not isinstance(io, AtomicObjectStoreIOManager):
            raise ConfigError(f"{name} needs an AtomicObjectStoreIOManager under resource key "
                              f"{io_manager_key!r}, got {type(io).__qualname__}")
        report = io.partition_store().collect_garbage()
        context.log.info(f"garbage collection: {report}")
        return dg.Output(None, metadata={
            "partitions_scanned": report.partitions_scanned,
            "objects_removed": report.objects_removed,
            "bytes_removed": report.bytes_removed,
            "incomplete_removed": report.incomplete_removed,
        })

    @dg.job(name=name, description=garbage_collection_job.__doc__)
    def job() -> None:
        collect()

    return job
