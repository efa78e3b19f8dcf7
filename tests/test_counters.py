"""Metrics from fn (issue #25, item 4): ``stage.count(name, n)`` adds to per-partition
counters that are checkpointed with their batch, so a resume keeps them exact, and that
reach the materialization as ``counts/<name>``.

Before: ``StageContext`` had no way to report anything; tokens, retries and HTTP errors
could only go into data columns.
"""

from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest

from longrun_dagster import AtomicObjectStoreIOManager, ConfigError, StageContext, model_stage
from tests.helpers import pipeline

DAY = "2024-01-02"
FAIL_ONCE: set[int] = set()


def counting(batch: pd.DataFrame, stage: StageContext) -> pd.DataFrame:
    stage.count("tokens", 3 * len(batch))
    stage.count("calls")
    if stage.batch_index in FAIL_ONCE:
        FAIL_ONCE.discard(stage.batch_index)
        stage.count("tokens", 10_000)  # counted by a batch that raised: must not count
        raise RuntimeError(f"injected failure in batch {stage.batch_index}")
    return pipeline.score_batch(batch, stage)


@pytest.fixture
def io(tmp_path: Path) -> AtomicObjectStoreIOManager:
    return AtomicObjectStoreIOManager(base_uri=(tmp_path / "lr").as_uri())


def run(io: AtomicObjectStoreIOManager, asset: dg.AssetsDefinition
        ) -> dg.ExecuteInProcessResult:
    return dg.materialize([pipeline.texts, asset], partition_key=DAY,
                          resources={"io_manager": io}, raise_on_error=False)


def counts(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    meta = pipeline.materialization_meta(result, "scores")
    return {k: v for k, v in meta.items() if k.startswith("counts/")}


def test_counters_reach_the_materialization(io: AtomicObjectStoreIOManager) -> None:
    scores = model_stage(upstream=pipeline.texts, schema=pipeline.Scored,
                         partitions_def=pipeline.DAYS, batch_size=10, name="scores",
                         setup=pipeline.load_model, max_bad_fraction=0.05)(counting)
    result = run(io, scores)
    assert result.success
    assert counts(result) == {"counts/tokens": 3 * pipeline.ROWS, "counts/calls": 20}
    again = run(io, scores)  # reused: the committing run's counters again, for the plots
    assert pipeline.materialization_meta(again, "scores")["reused"] is True
    assert counts(again) == counts(result)


def test_a_resumed_partition_counts_each_batch_once(io: AtomicObjectStoreIOManager) -> None:
    """Batch 7 raises (after counting): batches 0-6 are checkpointed with their counters
    and the retry resumes at batch 7; each batch counts once, by the attempt that kept
    it."""
    scores = model_stage(upstream=pipeline.texts, schema=pipeline.Scored,
                         partitions_def=pipeline.DAYS, batch_size=10, name="scores",
                         checkpoint_every_batches=3, setup=pipeline.load_model,
                         max_bad_fraction=0.05)(counting)
    FAIL_ONCE.add(7)
    try:
        first = run(io, scores)
    finally:
        FAIL_ONCE.clear()
    assert not first.success
    second = run(io, scores)
    assert second.success
    meta = pipeline.materialization_meta(second, "scores")
    assert meta["resumed_from_batch"] == 7 and meta["model_calls"] == 13
    assert counts(second) == {"counts/tokens": 3 * pipeline.ROWS, "counts/calls": 20}


@pytest.mark.parametrize(("name", "n"), [("", 1), (3, 1), ("tokens", float("nan")),
                                         ("tokens", "12"), ("tokens", True)])
def test_a_wrong_counter_names_itself(name: Any, n: Any) -> None:
    context = StageContext(dg.AssetKey("scores"), DAY, "run", None, None, {})
    with pytest.raises(ConfigError, match="stage.count"):
        context.count(name, n)
