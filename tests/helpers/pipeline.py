"""A small real pipeline for stage tests: text rows -> a real torch model stage.

The model function counts its calls and can misbehave on demand (``MISBEHAVE``), so tests
can inject malformed output; ``BATCH_SLEEP`` slows batches so kills land mid-run.
"""

import hashlib
import os
import time
from collections.abc import Iterator
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
import pandera.pandas as pa
import pytest
import torch

from longrun_dagster import StageContext, model_stage

DAYS = dg.DailyPartitionsDefinition(start_date="2024-01-01", end_date="2024-01-05")
ROWS = int(os.environ.get("PIPELINE_ROWS", "200"))
CALLS: list[int] = []  # batch indexes the model was called with, in this process
MISBEHAVE: dict[str, Any] = {}  # kind -> batches, e.g. {"nan": {1}}


@dg.asset(partitions_def=DAYS)
def texts(context: dg.AssetExecutionContext) -> pd.DataFrame:
    seed = int(hashlib.sha256(context.partition_key.encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng(seed)
    words = np.array("red green blue cyan magenta yellow black white".split())
    rows = [" ".join(rng.choice(words, 5)) for _ in range(ROWS)]
    return pd.DataFrame({"id": [f"{context.partition_key}-{i}" for i in range(ROWS)],
                         "text": rows})


class Scored(pa.DataFrameModel):
    id: str = pa.Field(str_length={"min_value": 1})
    score: float = pa.Field(ge=0.0, le=1.0)
    label: str = pa.Field(isin=["low", "high"])

    class Config:
        strict = True


def load_model(stage: StageContext) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 1), torch.nn.Sigmoid()).eval()


def featurize(text: pd.Series) -> torch.Tensor:
    feats = np.zeros((len(text), 16), dtype=np.float32)
    for row, value in enumerate(text):
        for word in value.split():
            feats[row, int(hashlib.md5(word.encode()).hexdigest(), 16) % 16] += 1.0
    return torch.from_numpy(feats)


def score_batch(batch: pd.DataFrame, stage: StageContext) -> pd.DataFrame:
    """Score text rows with a small real torch MLP."""
    CALLS.append(stage.batch_index)
    if os.environ.get("ANNOUNCE_BATCHES"):
        print(f"START {stage.batch_index}", flush=True)
    delay = float(os.environ.get("BATCH_SLEEP", "0"))
    if delay:
        time.sleep(delay)
    if stage.batch_index in MISBEHAVE.get("raise", ()):
        raise RuntimeError(f"injected failure in batch {stage.batch_index}")
    with torch.no_grad():
        score = stage.state(featurize(batch.text)).squeeze(1).numpy().astype("float64")
    out = pd.DataFrame({"id": batch.id.to_numpy(), "score": score,
                        "label": np.where(score > 0.5, "high", "low")})
    out = misbehave(out, stage.batch_index)
    if os.environ.get("ANNOUNCE_BATCHES"):
        print(f"BATCH {stage.batch_index}", flush=True)
    return out


@pytest.fixture(autouse=True)
def clean_pipeline() -> Iterator[None]:
    """For test modules that import it: no calls recorded, no misbehaviour armed."""
    CALLS.clear()
    MISBEHAVE.clear()
    yield
    MISBEHAVE.clear()


def make_scores(**overrides: Any) -> dg.AssetsDefinition:
    options: dict[str, Any] = dict(
        upstream=texts, schema=Scored, partitions_def=DAYS, batch_size=10,
        checkpoint_every_batches=3, checkpoint_every_seconds=3600, max_bad_fraction=0.05,
        code_version="1", setup=load_model, name="scores", pool="gpu",
        sigterm_grace_seconds=float(os.environ.get("SIGTERM_GRACE", "20")),
    )
    options.update(overrides)
    return model_stage(**options)(score_batch)


scores = make_scores()


@dg.asset(partitions_def=DAYS)
def summary(scores: pd.DataFrame) -> dict[str, float]:
    """Downstream of the stage: must not run when the stage fails its budget."""
    CALLS.append(-1)
    return {"mean": float(scores.score.mean())}


def misbehave(out: pd.DataFrame, index: int) -> pd.DataFrame:
    for kind, batches in MISBEHAVE.items():
        if index not in batches:
            continue
        if kind == "nan":
            out.loc[out.index[0], "score"] = float("nan")
        elif kind == "empty_id":
            out.loc[out.index[:2], "id"] = ""
        elif kind == "out_of_range":
            out.loc[out.index[0], "score"] = 7.5
        elif kind == "wrong_dtype":
            out["score"] = out["score"].astype(str)
        elif kind == "extra_column":
            out["debug"] = 1
        elif kind == "missing_column":
            out = out.drop(columns=["label"])
        elif kind == "short":
            out = out.iloc[:-3]
    return out



def committed_sha(base: Any, partition: str, asset: str = "scores") -> str:
    """A committed partition's content identity (``base``: an IO manager or a base URI):
    its content version and the SHA-256 of its rows as read back, re-encoded. Equal for
    the same rows, dtypes and values, however the rows were split into stored objects
    (a resumed attempt's shards differ from an uninterrupted one's)."""
    import hashlib

    from longrun_dagster import AtomicObjectStoreIOManager
    from longrun_dagster.formats import parquet

    io = base if isinstance(base, AtomicObjectStoreIOManager) else \
        AtomicObjectStoreIOManager(base_uri=base)
    manifest, frame = io.partition_store().load([asset], partition)
    return f"{manifest.data_version}:{hashlib.sha256(parquet.dumps(frame)).hexdigest()}"


def materialization_meta(result: dg.ExecuteInProcessResult, asset: str) -> dict[str, Any]:
    """The metadata values of ``asset``'s materialization in ``result``."""
    for event in result.get_asset_materialization_events():
        mat = event.step_materialization_data.materialization
        if mat.asset_key.to_user_string() == asset:
            return {k: v.value for k, v in mat.metadata.items()}
    raise AssertionError(f"no materialization of {asset}")
