"""Mistakes a new user makes, each with an error that comes early and names the fix
(issue #25, item 7). Each test's docstring quotes what the user got instead."""

import asyncio
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pandera.pandas as pa
import pytest

from longrun_dagster import (
    AtomicObjectStoreIOManager,
    ConfigError,
    StageContext,
    StageOutputError,
    model_stage,
)
from longrun_dagster.storage import open_store
from tests.helpers import pipeline

DAY = "2024-01-02"


class Scores(pa.DataFrameModel):
    id: str
    neg_score: float

    class Config:
        strict = True


def _score(batch: pd.DataFrame, stage: StageContext) -> pd.DataFrame:
    return pd.DataFrame({"id": batch.id.to_numpy(), "neg_score": 0.5})


@pytest.fixture
def io(tmp_path: Path) -> AtomicObjectStoreIOManager:
    return AtomicObjectStoreIOManager(base_uri=(tmp_path / "lr").as_uri())


def _failure(result: dg.ExecuteInProcessResult) -> str:
    assert not result.success
    [event] = [e for e in result.all_events if e.is_step_failure]
    error = event.step_failure_data.error
    assert error is not None
    return str(error.message) + "".join(
        str(c.message) for c in [error.cause] if c is not None)


def test_a_misspelled_upstream_is_named_at_the_start_of_the_run(
        io: AtomicObjectStoreIOManager) -> None:
    """upstream="tikets" was accepted, and the run said "not committed (no manifest at
    .../tikets/_unpartitioned); materialize it first"."""
    stage = model_stage(upstream="txets", schema=Scores, partitions_def=pipeline.DAYS,
                        name="neg")(_score)
    result = dg.materialize([pipeline.texts, stage], partition_key=DAY,
                            resources={"io_manager": io}, raise_on_error=False)
    message = _failure(result)
    assert "'txets'" in message and "no asset" in message and "'texts'" in message
    assert "materialize it first" not in message


def test_an_upstream_on_another_io_manager_is_named(io: AtomicObjectStoreIOManager,
                                                    tmp_path: Path) -> None:
    """An upstream on FilesystemIOManager, materialized in the same run, was reported as
    "not committed ... materialize it first"."""
    @dg.asset(partitions_def=pipeline.DAYS, io_manager_key="fs")
    def texts() -> pd.DataFrame:
        return pd.DataFrame({"id": ["a", "b"], "text": ["x", "y"]})

    stage = model_stage(upstream=texts, schema=Scores, partitions_def=pipeline.DAYS,
                        name="neg")(_score)
    result = dg.materialize(
        [texts, stage], partition_key=DAY, raise_on_error=False,
        resources={"io_manager": io, "fs": dg.FilesystemIOManager(base_dir=str(tmp_path))})
    message = _failure(result)
    assert "'fs'" in message and "FilesystemIOManager" in message
    assert "AtomicObjectStoreIOManager" in message and "materialize it first" not in message


def test_an_async_function_is_refused_where_the_stage_is_declared() -> None:
    """async def fn was accepted and failed at run time ("returned coroutine")."""
    async def fetch(batch: pd.DataFrame, stage: StageContext) -> pd.DataFrame:
        await asyncio.sleep(0)
        return batch

    with pytest.raises(ConfigError, match="async function.*Define it with def"):
        model_stage(upstream=pipeline.texts, schema=Scores, name="neg")(fetch)


@pytest.mark.parametrize(("uri", "says"), [
    ("s3//bucket/x", "s3://bucket/x"),
    ("file//srv/data", "file:///srv/data"),
    ("data/lr", "absolute"),
    ("./lr", "absolute"),
])
def test_a_malformed_or_relative_base_uri_is_refused(uri: str, says: str) -> None:
    """LONGRUN_BASE_URI=s3//bucket/x exited 0 and wrote to ./s3/bucket/x; a relative path
    is resolved against each process's working directory (the CLI's and the daemon's
    differ)."""
    with pytest.raises(ConfigError, match=says.replace(".", r"\.")):
        open_store(uri)
    with pytest.raises(ConfigError, match=says.replace(".", r"\.")):  # when a run starts
        AtomicObjectStoreIOManager(base_uri=uri).partition_store()


def test_an_env_var_base_uri_is_checked_when_the_run_starts(
        io: AtomicObjectStoreIOManager, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LONGRUN_BASE_URI", "s3//bucket/x")
    with pytest.raises(ConfigError, match="s3://bucket/x"):
        AtomicObjectStoreIOManager().partition_store()


def test_a_misspelled_output_column_is_named_with_the_returned_columns(
        io: AtomicObjectStoreIOManager) -> None:
    """nag_score for neg_score was "80 of 80 output rows ... column_in_dataframe failed",
    three times, never naming the columns returned, and advising max_bad_fraction."""
    def misspelled(batch: pd.DataFrame, stage: StageContext) -> pd.DataFrame:
        return pd.DataFrame({"id": batch.id.to_numpy(), "nag_score": 0.5})

    stage = model_stage(upstream=pipeline.texts, schema=Scores,
                        partitions_def=pipeline.DAYS, name="neg", batch_size=50)(misspelled)
    result = dg.materialize([pipeline.texts, stage], partition_key=DAY,
                            resources={"io_manager": io}, raise_on_error=False)
    message = _failure(result)
    assert "missing column(s) 'neg_score'" in message
    assert "unexpected column(s) 'nag_score'" in message
    assert "returned columns: 'id', 'nag_score'" in message
    assert "max_bad_fraction" not in message
    assert message.count("column_in_dataframe") <= 1


def test_a_wrong_return_type_is_a_type_error(io: AtomicObjectStoreIOManager) -> None:
    """A wrong return type raised ConfigError (a ValueError)."""
    def returns_a_dict(batch: pd.DataFrame, stage: StageContext) -> Any:
        return {"id": list(batch.id)}

    stage = model_stage(upstream=pipeline.texts, schema=Scores,
                        partitions_def=pipeline.DAYS, name="neg")(returns_a_dict)
    with pytest.raises(StageOutputError, match="returned dict.*pandas DataFrame") as caught:
        dg.materialize([pipeline.texts, stage], partition_key=DAY,
                       resources={"io_manager": io})
    assert isinstance(caught.value, TypeError)
