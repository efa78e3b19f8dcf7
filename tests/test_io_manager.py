"""AtomicObjectStoreIOManager through Dagster's materialize(), on both backends."""

from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import torch
from dagster_aws.s3 import S3Resource

from longrun_dagster import AtomicObjectStoreIOManager, CorruptObject, UnsupportedOutput
from longrun_dagster.commit import PartitionStore

DAYS = dg.DailyPartitionsDefinition(start_date="2024-01-01", end_date="2024-01-04")


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def io_manager(request: pytest.FixtureRequest, tmp_path: Path) -> AtomicObjectStoreIOManager:
    if request.param == "local":
        return AtomicObjectStoreIOManager(base_uri=(tmp_path / "lr").as_uri())
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    return AtomicObjectStoreIOManager(
        base_uri=f"s3://{bucket}/lr",
        s3=S3Resource(endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing"),
    )


@dg.asset(partitions_def=DAYS)
def rows(context: dg.AssetExecutionContext) -> pd.DataFrame:
    day = context.partition_key
    return pd.DataFrame({"day": [day] * 3, "x": [1.0, 2.0, 3.0]})


@dg.asset(partitions_def=DAYS)
def doubled(rows: pd.DataFrame) -> pd.DataFrame:
    return rows.assign(x=rows.x * 2)


@dg.asset(ins={"rows": dg.AssetIn(partition_mapping=dg.AllPartitionMapping())})
def totals(rows: dict[str, pd.DataFrame]) -> dict[str, float]:
    return {day: float(frame.x.sum()) for day, frame in sorted(rows.items())}


@dg.asset(partitions_def=DAYS)
def embeddings(context: dg.AssetExecutionContext) -> dict[str, torch.Tensor]:
    return {"emb": torch.arange(6, dtype=torch.float32).reshape(2, 3)}


@dg.asset(partitions_def=DAYS)
def arrays(embeddings: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {"norms": embeddings["emb"].norm(dim=1).numpy()}


def run(assets: list[Any], io: AtomicObjectStoreIOManager, key: str | None = None,
        **kw: Any) -> dg.ExecuteInProcessResult:
    return dg.materialize(assets, partition_key=key, resources={"io_manager": io}, **kw)


def test_partitioned_chain_and_all_partitions_aggregate(io: AtomicObjectStoreIOManager) -> None:
    for day in ("2024-01-01", "2024-01-02", "2024-01-03"):
        assert run([rows, doubled], io, day).success
    result = dg.materialize([rows, totals], resources={"io_manager": io},
                            selection=[totals.key])
    assert result.output_for_node("totals") == {
        "2024-01-01": 6.0, "2024-01-02": 6.0, "2024-01-03": 6.0}
    frame = io.partition_store().read(["doubled"], "2024-01-02")
    assert frame[0].rows == 3


io = pytest.fixture(lambda io_manager: io_manager)  # shorter name inside tests


def test_materialization_metadata_names_uri_bytes_rows_checksum(
    io: AtomicObjectStoreIOManager,
) -> None:
    result = run([rows], io, "2024-01-01")
    mat = result.asset_materializations_for_node("rows")[0]
    meta = mat.metadata
    assert meta["rows"].value == 3 and meta["bytes"].value > 0
    assert meta["reused"].value is False and meta["format"].value == "parquet"
    assert len(str(meta["digest"].value)) == 64 and meta["digest_algorithm"].value == "blake3"
    assert str(meta["uri"].value).endswith("rows/p=2024-01-01")
    assert meta["committed_by_run"].value == result.run_id


def test_tensors_and_arrays_as_safetensors(io: AtomicObjectStoreIOManager) -> None:
    assert run([embeddings, arrays], io, "2024-01-02").success
    manifest, _ = io.partition_store().read(["arrays"], "2024-01-02")
    assert manifest.format == "safetensors-numpy"
    loaded = dg.materialize([embeddings, arrays], partition_key="2024-01-02",
                            resources={"io_manager": io}, selection=[arrays.key])
    np.testing.assert_allclose(loaded.output_for_node("arrays")["norms"],
                               [np.sqrt(5.0), np.sqrt(50.0)], rtol=1e-6)


def test_unpicklable_output_is_refused_with_the_fix(io: AtomicObjectStoreIOManager) -> None:
    @dg.asset
    def odd() -> object:
        return {"when": object()}

    with pytest.raises(UnsupportedOutput, match="without pickle.*Return a pandas DataFrame"):
        run([odd], io)


def test_a_dict_json_would_change_is_refused_naming_where(
    io: AtomicObjectStoreIOManager,
) -> None:
    """A plain asset returning {1: 10, 2: (3, 4)} was committed and loaded back downstream
    as {'1': 10, '2': [3, 4]} without a word."""
    @dg.asset
    def lookup() -> dict[int, Any]:
        return {1: 10, 2: (3, 4)}

    with pytest.raises(UnsupportedOutput, match=r"value has the int key 1, .*str keys"):
        run([lookup], io)
    assert io.partition_store().lookup(["lookup"], None) is None


def test_multi_partition_run_commits_each_partition(io: AtomicObjectStoreIOManager) -> None:
    """A single-run backfill over a range hands the IO manager {partition: value}."""
    @dg.asset(partitions_def=DAYS, backfill_policy=dg.BackfillPolicy.single_run())
    def ranged(context: dg.AssetExecutionContext) -> dict[str, pd.DataFrame]:
        return {k: pd.DataFrame({"k": [k]}) for k in context.partition_keys}

    result = dg.materialize(
        [ranged], resources={"io_manager": io},
        tags={"dagster/asset_partition_range_start": "2024-01-01",
              "dagster/asset_partition_range_end": "2024-01-03"},
    )
    assert result.success
    store = io.partition_store()
    for day in ("2024-01-01", "2024-01-02", "2024-01-03"):
        assert store.lookup(["ranged"], day) is not None


def test_corrupt_upstream_fails_downstream_naming_the_object(
    io: AtomicObjectStoreIOManager,
) -> None:
    run([rows], io, "2024-01-01")
    store: PartitionStore = io.partition_store()
    manifest = store.lookup(["rows"], "2024-01-01")
    assert manifest is not None
    key = store.prefix(["rows"], "2024-01-01") + manifest.objects[0].name
    raw = store.store.get(key)[0]
    store.store.put(key, raw[:-1] + bytes([raw[-1] ^ 0xFF]))
    with pytest.raises(CorruptObject, match=manifest.objects[0].name):
        dg.materialize([rows, doubled], partition_key="2024-01-01",
                       resources={"io_manager": io}, selection=[doubled.key])
