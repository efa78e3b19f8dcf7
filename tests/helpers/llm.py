"""A small pipeline with an API stage, for tests: text rows -> ``extracted`` (chat, with a
pydantic answer model) against the test server (``longrun_dagster.llm_server``).

The server's URL comes from ``LLM_BASE_URL`` (a subprocess reads it too); stage options
come from ``API_OPTIONS`` (JSON) so a test can vary them across processes.
"""

import hashlib
import json
import os
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
import pandera.pandas as pa
import pydantic

from longrun_dagster import AtomicObjectStoreIOManager, Heartbeat, StageContext
from longrun_dagster.api.answer import Answer
from longrun_dagster.api.stage import ApiEndpoint, api_stage

DAYS = dg.DailyPartitionsDefinition(start_date="2024-01-01", end_date="2024-01-05")
ROWS = int(os.environ.get("LLM_ROWS", "120"))
DAY = "2024-01-02"


@dg.asset(partitions_def=DAYS)
def notes(context: dg.AssetExecutionContext) -> pd.DataFrame:
    seed = int(hashlib.sha256(context.partition_key.encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng(seed)
    words = np.array("red green blue cyan magenta yellow black white".split())
    return pd.DataFrame({"id": [f"{context.partition_key}-{i}" for i in range(ROWS)],
                         "text": [f"note {i}: " + " ".join(rng.choice(words, 4 + i % 12))
                                  for i in range(ROWS)]})


class Extraction(pydantic.BaseModel):
    summary: str
    n_words: int
    label: str


class Extracted(pa.DataFrameModel):
    id: str
    summary: str
    n_words: int = pa.Field(ge=1)
    label: str = pa.Field(isin=["short", "long"])

    class Config:
        strict = True


def ask(row: dict[str, Any], stage: StageContext) -> dict[str, Any]:
    """Extract a summary, a word count and a label from a note."""
    return {"messages": [{"role": "system", "content": "Answer in JSON."},
                         {"role": "user", "content": row["text"]}]}


def parse(answer: Answer, row: dict[str, Any], stage: StageContext) -> dict[str, Any]:
    parsed: Extraction = answer.parsed
    return {"id": row["id"], **parsed.model_dump()}


def options() -> dict[str, Any]:
    given: dict[str, Any] = json.loads(os.environ.get("API_OPTIONS", "{}"))
    hooks = ["heartbeat"] if os.environ.get("LLM_HEARTBEAT") else []
    return {"batch_size": 16, "max_in_flight": 8, "retry_base_seconds": 0.05,
            "max_bad_fraction": 0.2, "hook_resource_keys": hooks, **given}


def extracted_stage(**changes: Any) -> dg.AssetsDefinition:
    return api_stage(upstream=notes, schema=Extracted, model="longrun-tiny", parse=parse,
                     response_model=Extraction, partitions_def=DAYS, name="extracted",
                     **{**options(), **changes})(ask)


def resources(base: str, url: str | None = None, **endpoint: Any) -> dict[str, Any]:
    found: dict[str, Any] = {
        "io_manager": AtomicObjectStoreIOManager(base_uri=base),
        "llm": ApiEndpoint(base_url=url or os.environ["LLM_BASE_URL"], **endpoint)}
    if os.environ.get("LLM_HEARTBEAT"):  # seconds of stall timeout, watchdog on
        found["heartbeat"] = Heartbeat(interval_seconds=0.2, watchdog=True,
                                       stall_timeout_seconds=float(os.environ["LLM_HEARTBEAT"]))
    return found


extracted = extracted_stage()

defs = dg.Definitions(assets=[notes, extracted],
                      resources=resources(os.environ.get("LLM_STORE", "file:///tmp/lr-llm"))
                      if os.environ.get("LLM_BASE_URL") else {})


def main() -> int:
    """``python -m tests.helpers.llm <base_uri> <server url>``: materialize ``extracted``
    for DAY in this process (the upstream committed already); last line RESULT ..."""
    import sys

    base_uri, url = sys.argv[1], sys.argv[2]
    result = dg.materialize([notes, extracted], selection=[extracted], partition_key=DAY,
                            raise_on_error=False, resources=resources(base_uri, url),
                            run_config={"loggers": {"console": {"config": {
                                "log_level": "INFO"}}}})
    print("RESULT", "SUCCESS" if result.success else "FAILED", flush=True)
    return 0 if result.success else 1


if __name__ == "__main__":
    raise SystemExit(main())
