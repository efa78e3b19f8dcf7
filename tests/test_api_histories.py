"""What becomes of each row of an API stage, for generated histories of what the endpoint
does to its requests (issue 27): hypothesis writes, per row, the faults its 1st, 2nd...
request meets (429, 500, a dropped connection, 400, malformed JSON, a truncated or empty
answer); the test server plays them; a pure model of the retry policy says what the row
must end as (committed, or quarantined with which reason, after how many requests), and
the whole partition must end as the model says: committed with exactly those rows and
counts, or, when nothing was ever answered, an outage.

CI runs a fixed (derandomized) set of examples; ``LONGRUN_SLOW=1`` runs many new ones.
"""

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import dagster as dg
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longrun_dagster import PartitionStore, open_store
from longrun_dagster.llm_server import LlmServer
from tests.helpers import llm

SLOW = os.environ.get("LONGRUN_SLOW") == "1"
MAX_RETRIES = 2
ROWS = 6
RETRIED = ("rate_limited", "server_error", "dropped")
ANSWERED = {"malformed": "malformed_json", "truncated": "truncated", "empty": "empty"}
FAULTS = [*RETRIED, "bad_request", *ANSWERED]


@dataclass(frozen=True)
class Expected:
    reason: str | None
    """None: committed; else the quarantine reason."""
    requests: int


def expected(script: list[str | None]) -> Expected:
    """The retry policy as a model: retried faults are tried again up to MAX_RETRIES
    times; a 400 is refused at once; an answer, good or malformed, ends the row."""
    for tries in range(1, MAX_RETRIES + 2):
        fault = script[tries - 1] if tries - 1 < len(script) else None
        if fault is None:
            return Expected(None, tries)
        if fault == "bad_request":
            return Expected("http_400", tries)
        if fault in ANSWERED:
            return Expected(ANSWERED[fault], tries)
    return Expected("retries_exhausted", MAX_RETRIES + 1)


@pytest.fixture(scope="module")
def server() -> Iterator[LlmServer]:
    with LlmServer() as running:
        running.set_faults(retry_after_seconds=0.01)
        yield running


scripts = st.lists(st.lists(st.one_of(st.none(), st.sampled_from(FAULTS)), max_size=4),
                   min_size=ROWS, max_size=ROWS)


@settings(max_examples=400 if SLOW else 12, deadline=None, database=None,
          derandomize=not SLOW,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(script=scripts)
def test_every_generated_history_ends_as_the_retry_policy_says(
        script: list[list[str | None]], server: LlmServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    base = tmp_path_factory.mktemp("h").joinpath("lr").as_uri()
    notes = _notes()
    texts = list(notes["text"])
    want = [expected(s) for s in script]
    server.reset()  # a row's requests after the last one the model counts are answered:
    server.set_faults(scripted={  # those are probes (an answered request sent again)
        t: s[:w.requests] for t, s, w in zip(texts, script, want, strict=True)})

    @dg.asset(partitions_def=llm.DAYS, name="notes")
    def upstream() -> pd.DataFrame:
        return notes

    stage = llm.extracted_stage(max_retries=MAX_RETRIES, retry_base_seconds=0.01,
                                outage_seconds=1.0, max_bad_fraction=1.0, batch_size=4,
                                max_in_flight=3)
    result = dg.materialize([upstream, stage], partition_key=llm.DAY,
                            resources=llm.resources(base, server.base_url),
                            raise_on_error=False)
    log = server.requests()
    asked = [sum(r["text"] == t for r in log) for t in texts]
    if all(w.reason == "retries_exhausted" for w in want):  # nothing was ever answered
        assert not result.success
        failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
        assert "the endpoint looks down" in str(failure.step_failure_data.error)
        return
    assert result.success
    store = PartitionStore(open_store(base))
    manifest = store.committed(["extracted"], llm.DAY)
    out = store.load_version(manifest)
    quarantine = store.load_version(manifest, "quarantine")
    got: dict[int, str | None] = {int(i.rsplit("-", 1)[1]): None for i in out["id"]}
    if quarantine is not None:
        for position, failures in zip(quarantine["position"], quarantine["failures"],
                                      strict=True):
            got[int(position)] = json.loads(failures)[0]["check"]
    assert [got.get(i, "missing") for i in range(ROWS)] == [w.reason for w in want]
    probes = [a - w.requests for a, w in zip(asked, want, strict=True)]
    assert all(p == 0 or (p > 0 and w.reason in (None, *ANSWERED.values()))
               for p, w in zip(probes, want, strict=True)), (asked, want)  # only answered
    [mat] = result.asset_materializations_for_node("extracted")           # rows probed
    meta = {k: v.value for k, v in mat.metadata.items()}
    assert meta["counts/requests"] == sum(w.requests for w in want)
    for reason in {w.reason for w in want} - {None}:
        assert meta[f"counts/quarantined/{reason}"] == sum(w.reason == reason for w in want)


def _notes() -> pd.DataFrame:
    words = "red green blue cyan magenta yellow".split()
    return pd.DataFrame({"id": [f"{llm.DAY}-{i}" for i in range(ROWS)],
                         "text": [f"row {i}: " + " ".join(words[i:]) for i in range(ROWS)]})


def test_the_model_of_the_policy() -> None:
    assert expected([]) == Expected(None, 1)
    assert expected(["rate_limited", None]) == Expected(None, 2)
    assert expected(["server_error", "dropped", "rate_limited"]) == \
        Expected("retries_exhausted", 3)
    assert expected(["server_error", "bad_request"]) == Expected("http_400", 2)
    assert expected(["malformed"]) == Expected("malformed_json", 1)


