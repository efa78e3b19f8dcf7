"""Several upstreams (issue #25, item 3): a stage reads the committed rows of several
assets of the same partition, row-aligned or joined on a declared column.

Before: one upstream per stage, so an LLM stage that needed ``text`` from the raw records
and the scores of a torch stage had the torch stage pass ``text`` through its output.
"""

from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pandera.pandas as pa
import pytest

from longrun_dagster import AtomicObjectStoreIOManager, StageContext, model_stage
from tests.helpers import pipeline

DAY = "2024-01-02"
SEEN: list[list[str]] = []


class Judged(pa.DataFrameModel):
    id: str
    verdict: str


def judge(batch: pd.DataFrame, stage: StageContext) -> pd.DataFrame:
    SEEN.append(list(batch.columns))
    verdict = [f"{t.split()[0]}:{label}" for t, label in zip(batch.text, batch.label,
                                                             strict=True)]
    return pd.DataFrame({"id": batch.id.to_numpy(), "verdict": verdict})


def judged(**kw: Any) -> dg.AssetsDefinition:
    options: dict[str, Any] = dict(
        upstream={"records": pipeline.texts, "scores": pipeline.scores}, schema=Judged,
        partitions_def=pipeline.DAYS, batch_size=50, name="judged", join_on="id")
    options.update(kw)
    return model_stage(**options)(judge)


@pytest.fixture
def io(tmp_path: Path) -> AtomicObjectStoreIOManager:
    pipeline.MISBEHAVE.clear()
    SEEN.clear()
    yield AtomicObjectStoreIOManager(base_uri=(tmp_path / "lr").as_uri())
    pipeline.MISBEHAVE.clear()


def run(io: AtomicObjectStoreIOManager, stage: dg.AssetsDefinition,
        scores: dg.AssetsDefinition = pipeline.scores) -> dg.ExecuteInProcessResult:
    return dg.materialize([pipeline.texts, scores, stage], partition_key=DAY,
                          resources={"io_manager": io}, raise_on_error=False)


def failure(result: dg.ExecuteInProcessResult) -> str:
    assert not result.success
    [event] = [e for e in result.all_events if e.is_step_failure]
    error = event.step_failure_data.error
    assert error is not None
    return error.message + (error.cause.message if error.cause else "")


def test_a_stage_joins_two_upstreams_on_a_column(io: AtomicObjectStoreIOManager) -> None:
    pipeline.MISBEHAVE["out_of_range"] = {3}  # scores quarantines one row: 199 of 200
    result = run(io, judged())
    assert result.success
    assert SEEN[0] == ["id", "text", "score", "label"]
    meta = pipeline.materialization_meta(result, "judged")
    assert meta["rows_in"] == pipeline.ROWS - 1 and meta["rows_out"] == pipeline.ROWS - 1
    assert meta["rows_unjoined"] == 1  # the quarantined row has no score: said, not hidden
    _, out = io.partition_store().load(["judged"], DAY)
    _, texts = io.partition_store().load(["texts"], DAY)
    first = texts.set_index("id").text.str.split().str[0]
    assert all(v.split(":")[0] == first[i] for i, v in zip(out.id, out.verdict, strict=True))


def test_both_upstreams_are_lineage_and_fingerprint(io: AtomicObjectStoreIOManager) -> None:
    stage = judged()
    deps = {d.asset_key for d in stage.specs_by_key[dg.AssetKey("judged")].deps}
    assert deps == {dg.AssetKey("texts"), dg.AssetKey("scores")}
    assert run(io, stage).success
    again = run(io, stage)
    assert pipeline.materialization_meta(again, "judged")["reused"] is True
    # the second upstream's rows change (a new scores model that quarantines a row):
    # the stage recomputes (same rows from a new code version would be reused)
    pipeline.MISBEHAVE["out_of_range"] = {3}
    changed = run(io, stage, scores=pipeline.make_scores(code_version="2"))
    assert changed.success
    assert pipeline.materialization_meta(changed, "judged")["reused"] is False


def test_row_aligned_upstreams_without_a_key(io: AtomicObjectStoreIOManager) -> None:
    result = run(io, judged(join_on=None))
    assert result.success and SEEN[0] == ["id", "text", "score", "label"]


def test_row_aligned_upstreams_of_different_lengths_are_refused(
        io: AtomicObjectStoreIOManager) -> None:
    pipeline.MISBEHAVE["out_of_range"] = {3}
    message = failure(run(io, judged(join_on=None)))
    assert "'records' has 200 rows" in message and "'scores' has 199" in message
    assert "join_on=" in message


def test_a_column_in_two_upstreams_is_refused(io: AtomicObjectStoreIOManager) -> None:
    @dg.asset(partitions_def=pipeline.DAYS, name="other_texts")
    def other_texts(context: dg.AssetExecutionContext) -> pd.DataFrame:
        return pd.DataFrame({"id": [f"{DAY}-{i}" for i in range(pipeline.ROWS)],
                             "text": ["different"] * pipeline.ROWS})

    stage = judged(upstream={"records": pipeline.texts, "other": other_texts,
                             "scores": pipeline.scores})
    result = dg.materialize([pipeline.texts, other_texts, pipeline.scores, stage],
                            partition_key=DAY, resources={"io_manager": io},
                            raise_on_error=False)
    message = failure(result)
    assert "'text'" in message and "'records'" in message and "'other'" in message


def test_a_join_key_missing_or_repeated_is_named(io: AtomicObjectStoreIOManager) -> None:
    message = failure(run(io, judged(join_on="doc_id")))
    assert "join_on='doc_id'" in message and "'records'" in message and "id, text" in message
