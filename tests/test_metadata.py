"""What the Dagster UI shows for a stage: Dagster's standard metadata (row count, URI,
the column schema from the pandera schema), failure cases as a table, and a reused
partition that keeps the figures of the run that computed it."""

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from longrun_dagster import AtomicObjectStoreIOManager, GpuGuard
from tests.helpers import pipeline

DAY = "2024-01-02"


@pytest.fixture
def misbehave() -> Iterator[dict[str, Any]]:
    pipeline.MISBEHAVE.clear()
    yield pipeline.MISBEHAVE
    pipeline.MISBEHAVE.clear()


def materialize(tmp_path: Path, instance: dg.DagsterInstance) -> dg.ExecuteInProcessResult:
    stage = pipeline.make_scores(hook_resource_keys=["gpu"])
    return dg.materialize([pipeline.texts, stage], partition_key=DAY, instance=instance,
                          resources={"io_manager": AtomicObjectStoreIOManager(
                              base_uri=(tmp_path / "lr").as_uri()),
                              "gpu": GpuGuard(backend="host")})


def stage_metadata(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    [event] = [e for e in result.get_asset_materialization_events()
               if e.asset_key == dg.AssetKey("scores")]
    return dict(event.step_materialization_data.materialization.metadata)


def test_the_column_schema_comes_from_the_pandera_schema() -> None:
    stage = pipeline.make_scores()
    schema = stage.specs_by_key[dg.AssetKey("scores")].metadata["dagster/column_schema"]
    columns = {c.name: c for c in schema.columns}
    assert list(columns) == ["id", "score", "label"]
    assert columns["score"].type == "float64" and not columns["score"].constraints.nullable
    assert columns["score"].constraints.other == ["greater_than_or_equal_to(0.0)",
                                                  "less_than_or_equal_to(1.0)"]
    assert columns["label"].constraints.other == ["isin(['low', 'high'])"]


def test_materializations_carry_dagsters_standard_metadata(tmp_path: Path) -> None:
    with dg.instance_for_test() as instance:
        result = materialize(tmp_path, instance)
    assert result.success
    meta = stage_metadata(result)
    assert meta["dagster/row_count"].value == pipeline.ROWS
    assert meta["dagster/uri"].value.startswith((tmp_path / "lr").as_uri())
    assert meta["dagster/uri"].value.endswith(f"scores/p={DAY}")


def test_failure_cases_are_a_table(tmp_path: Path, misbehave: dict[str, Any]) -> None:
    misbehave["out_of_range"] = {2}
    with dg.instance_for_test() as instance:
        result = materialize(tmp_path, instance)
    assert result.success  # 1 bad row of 200: within the 5% budget, quarantined
    [check] = result.get_asset_check_evaluations()
    table = check.metadata["failure_sample"]
    assert isinstance(table, dg.TableMetadataValue)
    assert [c.name for c in table.schema.columns] == ["column", "check", "value", "row",
                                                      "row_values"]
    [record] = table.records
    row_values = record.data.pop("row_values")
    assert record.data == {"column": "score", "check": "less_than_or_equal_to(1.0)",
                           "value": "7.5", "row": 20}
    # the offending row itself, not only the value that failed (value: nan said nothing)
    assert f'"id":"{DAY}-20"' in row_values and '"score":7.5' in row_values


def test_the_quarantine_is_readable_and_its_uri_is_in_the_metadata(
        tmp_path: Path, misbehave: dict[str, Any]) -> None:
    """Metadata gave the partition's folder, and the README did not say how to read the
    quarantine; users guessed partition_store().load([asset], part, role="quarantine")."""
    misbehave["out_of_range"] = {2}
    misbehave["nan"] = {5}
    with dg.instance_for_test() as instance:
        result = materialize(tmp_path, instance)
    assert result.success
    meta = stage_metadata(result)
    uri = meta["quarantine_uri"].value
    assert uri.startswith((tmp_path / "lr").as_uri()) and "quarantine" in uri
    assert Path(uri.removeprefix("file://")).is_file()
    io = AtomicObjectStoreIOManager(base_uri=(tmp_path / "lr").as_uri())
    bad = io.load_quarantine("scores", DAY)
    assert list(bad.index) == [20, 50] and bad.index.name == "row"
    assert list(bad.columns) == ["id", "score", "label", "failures"]
    assert bad.loc[20, "score"] == 7.5 and bad.loc[20, "id"] == f"{DAY}-20"
    assert [f["check"] for f in bad.loc[20, "failures"]] == ["less_than_or_equal_to(1.0)"]
    assert bad.loc[50, "failures"][0]["column"] == "score"
    assert meta["bad_fraction"].value == 0.01  # 2 of 200, rounded (not 0.01000000002)


def test_a_partition_without_bad_rows_has_an_empty_quarantine(tmp_path: Path) -> None:
    with dg.instance_for_test() as instance:
        assert materialize(tmp_path, instance).success
    io = AtomicObjectStoreIOManager(base_uri=(tmp_path / "lr").as_uri())
    bad = io.load_quarantine(dg.AssetKey("scores"), DAY)
    assert len(bad) == 0 and "failures" in bad.columns
    assert "quarantine_uri" not in stage_metadata_of(tmp_path)


def stage_metadata_of(tmp_path: Path) -> dict[str, Any]:
    with dg.instance_for_test() as instance:
        return stage_metadata(materialize(tmp_path, instance))


def test_a_reused_partition_keeps_the_figures_of_the_run_that_computed_it(
        tmp_path: Path, misbehave: dict[str, Any]) -> None:
    """A reuse backfill re-emitted model_calls=0 and wall_seconds=0.0 and dropped
    vram_peak_mb and bad_fraction: the UI's per-partition plots went to zero."""
    misbehave["out_of_range"] = {2}
    with dg.instance_for_test() as instance:
        first = materialize(tmp_path, instance)
        misbehave.clear()
        second = materialize(tmp_path, instance)
    assert first.success and second.success
    computed, reused = stage_metadata(first), stage_metadata(second)
    assert computed["reused"].value is False and reused["reused"].value is True
    assert reused["committed_by_run"].value == first.run_id
    for key in ("model_calls", "wall_seconds", "vram_peak_mb", "bad_fraction",
                "rows_quarantined", "dagster/row_count"):
        assert reused[key] == computed[key], key
    assert reused["model_calls"].value == 20 and reused["bad_fraction"].value > 0


def test_the_vram_backend_line_is_said_once_per_run(tmp_path: Path) -> None:
    """A long "VRAM guard: no GPU backend" INFO line was printed on every step."""
    first = pipeline.make_scores(hook_resource_keys=["gpu"])
    second = pipeline.make_scores(hook_resource_keys=["gpu"], name="scores_again")
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [pipeline.texts, first, second], partition_key=DAY, instance=instance,
            resources={"io_manager": AtomicObjectStoreIOManager(
                base_uri=(tmp_path / "lr").as_uri()), "gpu": GpuGuard(backend="host")})
        assert result.success
        lines = [e for e in instance.all_logs(result.run_id)
                 if "VRAM guard:" in (e.user_message or "")]
    assert [e.level for e in lines] == [logging.INFO, logging.DEBUG]
