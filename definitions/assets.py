"""Example pipeline: text records -> torch embeddings -> torch quality scores.

Every model step is a ``model_stage``: validated with pandera, checkpointed, reused when
already committed, guarded by ``GpuGuard`` (host memory on a CPU machine).
"""

import hashlib

import dagster as dg
import numpy as np
import pandas as pd
import pandera.pandas as pa
import torch

from longrun_dagster import StageContext, model_stage

DAYS = dg.DailyPartitionsDefinition(start_date="2024-01-01", end_date="2024-01-08")
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
ROWS_PER_DAY = 512
DIM = 16


def _seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


@dg.asset(partitions_def=DAYS, group_name="example")
def records(context: dg.AssetExecutionContext) -> pd.DataFrame:
    """Synthetic text records for one day, the same on every run."""
    gen = torch.Generator().manual_seed(_seed(context.partition_key))
    picks = torch.randint(len(WORDS), (ROWS_PER_DAY, 6), generator=gen).tolist()
    texts = [" ".join(WORDS[i] for i in row) for row in picks]
    return pd.DataFrame({"id": [f"{context.partition_key}-{i:05d}" for i in range(len(texts))],
                         "text": texts})


class Embedded(pa.DataFrameModel):
    id: str = pa.Field(str_length={"min_value": 1})
    norm: float = pa.Field(gt=0)
    embedding: object

    class Config:
        strict = True


def load_embedder(stage: StageContext) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(len(WORDS), 32), torch.nn.Tanh(),
                               torch.nn.Linear(32, DIM)).eval()


@model_stage(upstream=records, schema=Embedded, partitions_def=DAYS, batch_size=64,
             checkpoint_every_batches=4, code_version="1", setup=load_embedder,
             hook_resource_keys=["gpu"], pool="gpu", group_name="example")
def embeddings(batch: pd.DataFrame, stage: StageContext) -> pd.DataFrame:
    """Bag-of-words counts through a fixed-seed torch encoder."""
    counts = torch.zeros(len(batch), len(WORDS))
    for row, text in enumerate(batch.text):
        for word in text.split():
            counts[row, WORDS.index(word)] += 1
    with torch.no_grad():
        emb = stage.state(counts)
    return pd.DataFrame({"id": batch.id.to_numpy(), "norm": emb.norm(dim=1).double().numpy(),
                         "embedding": list(emb.numpy().astype(np.float32))})


class Scored(pa.DataFrameModel):
    id: str
    quality: float = pa.Field(ge=0, le=1)

    class Config:
        strict = True


def load_scorer(stage: StageContext) -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(DIM, 1), torch.nn.Sigmoid()).eval()


@model_stage(upstream=embeddings, schema=Scored, partitions_def=DAYS, batch_size=128,
             checkpoint_every_batches=2, max_bad_fraction=0.02, code_version="1",
             setup=load_scorer, hook_resource_keys=["gpu"], pool="gpu", group_name="example")
def quality(batch: pd.DataFrame, stage: StageContext) -> pd.DataFrame:
    """A torch classifier's quality score per record."""
    x = torch.from_numpy(np.stack(batch.embedding.to_numpy()))
    with torch.no_grad():
        score = stage.state(x).squeeze(1).double().numpy()
    return pd.DataFrame({"id": batch.id.to_numpy(), "quality": score})
