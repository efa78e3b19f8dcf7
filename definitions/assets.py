"""Example assets: deterministic text records per day, and torch features computed from them."""

import hashlib

import dagster as dg
import pandas as pd
import torch

DAYS = dg.DailyPartitionsDefinition(start_date="2024-01-01", end_date="2024-01-08")
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
ROWS_PER_DAY = 64
DIM = 8


def _seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


@dg.asset(partitions_def=DAYS)
def records(context: dg.AssetExecutionContext) -> pd.DataFrame:
    """Synthetic text records for one day, the same on every run."""
    gen = torch.Generator().manual_seed(_seed(context.partition_key))
    picks = torch.randint(len(WORDS), (ROWS_PER_DAY, 6), generator=gen).tolist()
    texts = [" ".join(WORDS[i] for i in row) for row in picks]
    return pd.DataFrame({"id": [f"{context.partition_key}-{i:04d}" for i in range(len(texts))],
                         "text": texts})


@dg.asset(partitions_def=DAYS)
def features(records: pd.DataFrame) -> pd.DataFrame:
    """A fixed-seed torch projection of bag-of-words counts (a stand-in embedding model)."""
    counts = torch.zeros(len(records), len(WORDS))
    for row, text in enumerate(records.text):
        for word in text.split():
            counts[row, WORDS.index(word)] += 1
    torch.manual_seed(0)
    model = torch.nn.Linear(len(WORDS), DIM)
    with torch.no_grad():
        emb = model(counts)
    return pd.DataFrame({"id": records.id, "norm": emb.norm(dim=1).numpy()})
