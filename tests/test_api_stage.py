"""API stages (issue #27): a model behind an OpenAI-compatible endpoint, called through the
official ``openai`` SDK against the test server on loopback."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest

from longrun_dagster.llm_server import LlmServer, answer_of
from tests.helpers import llm


@pytest.fixture
def server() -> Iterator[LlmServer]:
    with LlmServer() as running:
        yield running


def materialize(tmp_path: Path, server: LlmServer, asset: dg.AssetsDefinition | None = None,
                **endpoint: Any) -> dg.ExecuteInProcessResult:
    return dg.materialize([llm.notes, asset or llm.extracted], partition_key=llm.DAY,
                          resources=llm.resources((tmp_path / "lr").as_uri(), server.base_url,
                                                  **endpoint),
                          raise_on_error=False, selection=[(asset or llm.extracted).key])


def committed(tmp_path: Path) -> pd.DataFrame:
    from longrun_dagster import PartitionStore, open_store

    store = PartitionStore(open_store((tmp_path / "lr").as_uri()))
    return store.load_version(store.committed(["extracted"], llm.DAY))


def meta(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    [mat] = result.asset_materializations_for_node("extracted")
    return {k: v.value for k, v in mat.metadata.items()}


def notes_frame() -> pd.DataFrame:
    return dg.materialize([llm.notes], partition_key=llm.DAY).output_for_node("notes")


def test_every_row_is_answered_parsed_and_committed_in_input_order(
        tmp_path: Path, server: LlmServer) -> None:
    server.set_faults(latency_seconds=0.02, latency_jitter=0.9)
    dg.materialize([llm.notes], partition_key=llm.DAY,
                   resources=llm.resources((tmp_path / "lr").as_uri(), server.base_url))
    result = materialize(tmp_path, server)
    assert result.success
    out = committed(tmp_path)
    texts = notes_frame()
    assert list(out["id"]) == list(texts["id"])
    want = [answer_of(t) for t in texts["text"]]
    assert list(out["summary"]) == [w["summary"] for w in want]
    assert list(out["n_words"]) == [w["n_words"] for w in want]
    m = meta(result)
    assert m["counts/requests"] == llm.ROWS and m["rows_quarantined"] == 0
    assert m["counts/prompt_tokens"] > 0 and m["counts/completion_tokens"] > 0
    assert len(server.requests()) == llm.ROWS
