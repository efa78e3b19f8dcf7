"""API stages (issue #27): a model behind an OpenAI-compatible endpoint, called through the
official ``openai`` SDK against the test server on loopback (``llm_server``)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest

from longrun_dagster import AtomicObjectStoreIOManager, ConfigError, PartitionStore, open_store
from longrun_dagster.api.answer import BadAnswer
from longrun_dagster.api.journal import ANSWERS, FLUSH_SECONDS
from longrun_dagster.llm_server import LlmServer, answer_of
from tests.helpers import llm


@pytest.fixture
def server() -> Iterator[LlmServer]:
    with LlmServer() as running:
        yield running


@pytest.fixture
def base(tmp_path: Path, server: LlmServer) -> str:
    """A store with the upstream committed."""
    uri = (tmp_path / "lr").as_uri()
    dg.materialize([llm.notes], partition_key=llm.DAY,
                   resources=llm.resources(uri, server.base_url))
    return uri


def materialize(base: str, server: LlmServer, asset: dg.AssetsDefinition | None = None,
                **endpoint: Any) -> dg.ExecuteInProcessResult:
    asset = asset or llm.extracted
    return dg.materialize([llm.notes, asset], partition_key=llm.DAY, selection=[asset.key],
                          resources=llm.resources(base, server.base_url, **endpoint),
                          raise_on_error=False)


def committed(base: str) -> pd.DataFrame:
    store = PartitionStore(open_store(base))
    return store.load_version(store.committed(["extracted"], llm.DAY))


def quarantined(base: str) -> pd.DataFrame:
    store = PartitionStore(open_store(base))
    return store.load_version(store.committed(["extracted"], llm.DAY), "quarantine")


def meta(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    [mat] = result.asset_materializations_for_node("extracted")
    return {k: v.value for k, v in mat.metadata.items()}


def failure(result: dg.ExecuteInProcessResult) -> str:
    [event] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    return str(event.step_failure_data.error)


def texts() -> list[str]:
    frame = dg.materialize([llm.notes], partition_key=llm.DAY).output_for_node("notes")
    return list(frame["text"])


def answered(server: LlmServer) -> Counter[str]:
    """How many times each row (by its text) got an answer."""
    return Counter(r["text"] for r in server.requests() if r["status"] == 200)


def test_every_row_is_answered_parsed_and_committed_in_input_order(
        base: str, server: LlmServer) -> None:
    server.set_faults(latency_seconds=0.02, latency_jitter=0.9)
    result = materialize(base, server)
    assert result.success
    out, rows = committed(base), texts()
    assert list(out["id"]) == [f"{llm.DAY}-{i}" for i in range(llm.ROWS)]
    assert list(out["summary"]) == [answer_of(t)["summary"] for t in rows]
    assert list(out["n_words"]) == [answer_of(t)["n_words"] for t in rows]
    m = meta(result)
    assert m["counts/requests"] == llm.ROWS and m["rows_quarantined"] == 0
    assert m["counts/retries"] == 0
    # the test server's usage: the words of every message, plus 3
    assert m["counts/prompt_tokens"] == sum(len(t.split()) + len("Answer in JSON.".split()) + 3
                                            for t in rows)
    assert len(server.requests()) == llm.ROWS
    store = PartitionStore(open_store(base))  # no bad row: no quarantine object (loading
    manifest = store.committed(["extracted"], llm.DAY)  # it raised "unknown stored format
    assert store.load_version(manifest, "quarantine") is None  # 'parquet-batches'")
    again = materialize(base, server)  # committed: reused, nothing sent
    assert again.success and meta(again)["reused"] is True
    assert len(server.requests()) == llm.ROWS


def test_chaos_every_row_is_committed_or_quarantined_with_its_reason_and_counts_are_exact(
        base: str, server: LlmServer) -> None:
    """5% 429 (with Retry-After), 2% 500, 1% malformed and 1% truncated answers."""
    server.set_faults(rate_limited=0.05, retry_after_seconds=0.05, server_error=0.02,
                      malformed=0.01, truncated=0.01, seed=7)
    result = materialize(base, server)
    assert result.success, failure(result)
    log = server.requests()
    last: dict[str, dict[str, Any]] = {}
    for r in log:
        last[r["text"]] = r  # each row's final try
    want = Counter({"malformed": 0, "truncated": 0})
    for r in last.values():
        if r["fault"] in ("malformed", "truncated"):
            want[r["fault"]] += 1
    assert sum(r["fault"] in ("rate_limited", "server_error") for r in log) > 0
    m = meta(result)
    assert m["rows_out"] + m["rows_quarantined"] == llm.ROWS
    assert m.get("counts/quarantined/malformed_json", 0) == want["malformed"]
    assert m.get("counts/quarantined/truncated", 0) == want["truncated"]
    assert m["rows_quarantined"] == want["malformed"] + want["truncated"]
    assert m["counts/requests"] == len(log)
    assert m["counts/retries"] == len(log) - llm.ROWS
    q = quarantined(base)
    reasons = Counter(f[0]["check"] for f in q["failures"].map(json.loads))
    assert reasons == Counter({k: v for k, v in {"malformed_json": want["malformed"],
                                                 "truncated": want["truncated"]}.items() if v})
    good = {t for t, r in last.items() if r["fault"] is None}
    assert len(committed(base)) == len(good)
    for position, row in zip(q["position"], q["row"], strict=True):  # numbered as inputs
        assert json.loads(row)["id"] == f"{llm.DAY}-{position}"


def test_a_bad_request_is_not_retried_and_its_row_is_quarantined_with_status_and_error(
        base: str, server: LlmServer) -> None:
    server.set_faults(bad_request=0.1, seed=3)
    result = materialize(base, server)
    assert result.success, failure(result)
    log = server.requests()
    bad = [r for r in log if r["fault"] == "bad_request"]
    assert bad and all(n == 1 for n in Counter(r["text"] for r in log).values())
    q = quarantined(base)
    cases = [json.loads(f)[0] for f in q["failures"]]
    assert {c["check"] for c in cases} == {"http_400"}
    assert all("status 400" in c["value"] and "invalid" in c["value"] for c in cases)
    assert len(q) == len(bad)


def test_retry_after_is_honoured(base: str, server: LlmServer) -> None:
    server.set_faults(rate_limited=0.3, retry_after_seconds=0.4, seed=5)
    result = materialize(base, server)
    assert result.success, failure(result)
    by_row: dict[str, list[dict[str, Any]]] = {}
    for r in server.requests():
        by_row.setdefault(r["text"], []).append(r)
    gaps = [b["started"] - a["ended"] for tries in by_row.values()
            for a, b in zip(tries, tries[1:], strict=False) if a["status"] == 429]
    assert gaps and min(gaps) >= 0.4 - 0.02


def test_an_outage_ends_the_attempt_quarantines_nothing_and_a_relaunch_resumes(
        base: str, server: LlmServer) -> None:
    server.set_faults(down=True)
    slow = llm.extracted_stage(outage_seconds=1.0, retry_base_seconds=0.2)
    result = materialize(base, server, slow)
    assert not result.success
    assert "every request failed for 1s" in failure(result)
    assert "run the partition again to resume" in failure(result)
    server.set_faults(down=False)
    again = materialize(base, server, slow)
    assert again.success and meta(again)["rows_quarantined"] == 0
    assert len(committed(base)) == llm.ROWS


def test_a_request_given_up_while_others_are_answered_quarantines_its_row(
        base: str, server: LlmServer) -> None:
    server.set_faults(server_error=0.05, seed=11)
    stingy = llm.extracted_stage(max_retries=0)
    result = materialize(base, server, stingy)
    assert result.success, failure(result)
    failed = {r["text"] for r in server.requests() if r["status"] == 500}
    q = quarantined(base)
    cases = [json.loads(f)[0] for f in q["failures"]]
    assert {c["check"] for c in cases} == {"retries_exhausted"} and len(q) == len(failed)
    assert meta(result)["counts/quarantined/retries_exhausted"] == len(failed)


def test_kill_9_mid_partition_then_resume_asks_no_answered_row_again(
        base: str, server: LlmServer, tmp_path: Path) -> None:
    """Answers are kept as they arrive: after a kill -9 the relaunch sends only requests
    that were never answered, plus those answered in the last instant before the kill
    (not yet written: at most one flush interval's)."""
    server.set_faults(latency_seconds=0.05)
    env = {**os.environ, "LLM_ROWS": str(llm.ROWS), "PYTHONPATH": os.getcwd(),
           "API_OPTIONS": '{"max_in_flight": 4}'}
    child = subprocess.Popen([sys.executable, "-m", "tests.helpers.llm", base,
                              server.base_url], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(answered(server)) < llm.ROWS // 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    killed_at = time.time()
    child.wait()
    first = server.requests()
    assert 0 < len(answered(server)) < llm.ROWS
    result = materialize(base, server)
    assert result.success, failure(result)
    again = server.requests()[len(first):]
    before = {r["text"]: r["ended"] for r in first if r["status"] == 200}
    twice = [r["text"] for r in again if r["text"] in before]
    late = [t for t in twice if before[t] < killed_at - FLUSH_SECONDS - 0.5]
    assert late == [], f"rows answered well before the kill were asked again: {late}"
    assert len(twice) <= 4 + sum(1 for t in before.values()
                                 if t >= killed_at - FLUSH_SECONDS - 0.5)
    assert len(committed(base)) == llm.ROWS
    assert list(committed(base)["id"]) == [f"{llm.DAY}-{i}" for i in range(llm.ROWS)]


def test_answers_are_reused_when_parse_changes(base: str, server: LlmServer) -> None:
    """A changed parse (another fingerprint) recomputes the partition, but the answers are
    the same requests': nothing is sent again."""
    assert materialize(base, server).success
    sent = len(server.requests())

    def parse_upper(answer: Any, row: dict[str, Any], stage: Any) -> dict[str, Any]:
        return {**llm.parse(answer, row, stage), "summary": answer.parsed.summary.upper()}

    changed = llm.api_stage(upstream=llm.notes, schema=llm.Extracted, model="longrun-tiny",
                            parse=parse_upper, response_model=llm.Extraction,
                            partitions_def=llm.DAYS, name="extracted",
                            **llm.options())(llm.ask)
    result = materialize(base, server, changed)
    assert result.success and meta(result).get("reused") is not True
    assert len(server.requests()) == sent
    assert committed(base)["summary"].str.isupper().all()


def test_a_damaged_answers_object_is_skipped_and_only_its_requests_are_sent_again(
        base: str, server: LlmServer, tmp_path: Path) -> None:
    def refuse(answer: Any, row: dict[str, Any], stage: Any) -> dict[str, Any]:
        raise BadAnswer("refused", "this parse refuses every answer")

    refusing = llm.api_stage(upstream=llm.notes, schema=llm.Extracted, model="longrun-tiny",
                             parse=refuse, response_model=llm.Extraction,
                             partitions_def=llm.DAYS, name="extracted",
                             **{**llm.options(), "max_bad_fraction": 0.0})(llm.ask)
    assert not materialize(base, server, refusing).success  # over budget: not committed
    sent = len(server.requests())
    assert sent == llm.ROWS
    folder = next((tmp_path / "lr").rglob(ANSWERS.rstrip("/")))
    damaged = sorted(folder.iterdir())[0]
    data = bytearray(damaged.read_bytes())
    lines = data.count(b"\n")
    data[len(data) // 2] ^= 0x01
    damaged.write_bytes(bytes(data))
    result = materialize(base, server)  # another parse: recomputed from the answers kept
    assert result.success
    assert len(server.requests()) - sent == lines
    assert len(committed(base)) == llm.ROWS


def test_cost_limit_stops_before_it_is_passed_and_raising_it_resumes(
        base: str, server: LlmServer) -> None:
    prices = {"prompt": 1000.0, "completion": 2000.0}  # $ per million tokens
    capped = llm.extracted_stage(price_per_million_tokens=prices, max_cost_usd=0.5,
                                 params={"max_tokens": 16})
    result = materialize(base, server, capped)
    assert not result.success
    message = failure(result)
    assert "would pass max_cost_usd = 0.5" in message and "raise max_cost_usd" in message
    first = answered(server)
    assert 0 < len(first) < llm.ROWS
    raised = llm.extracted_stage(price_per_million_tokens=prices, max_cost_usd=100.0,
                                 params={"max_tokens": 16})
    result = materialize(base, server, raised)
    assert result.success, failure(result)
    assert max(answered(server).values()) == 1
    m = meta(result)
    assert 0.4 < m["counts/cost_usd"] < 100.0
    assert m["counts/cost_usd"] == pytest.approx(
        (m["counts/prompt_tokens"] * 1000 + m["counts/completion_tokens"] * 2000) / 1e6)


def test_embeddings(base: str, server: LlmServer) -> None:
    import numpy as np
    import pandera.pandas as pa

    from longrun_dagster.api.stage import api_stage
    from longrun_dagster.llm_server import embedding_of

    schema = pa.DataFrameSchema({"id": pa.Column(str), "embedding": pa.Column(object)})

    def embed_request(row: dict[str, Any], stage: Any) -> str:
        return str(row["text"])

    def embed_parse(answer: Any, row: dict[str, Any], stage: Any) -> dict[str, Any]:
        return {"id": row["id"], "embedding": np.asarray(answer.embedding, dtype="float32")}

    vectors = api_stage(upstream=llm.notes, schema=schema, model="tiny-embed",
                        kind="embeddings", parse=embed_parse, partitions_def=llm.DAYS,
                        name="extracted", batch_size=16, params={"dimensions": 4})(
        embed_request)
    result = materialize(base, server, vectors)
    assert result.success
    out = committed(base)
    assert [list(v) for v in out["embedding"][:3]] == [
        list(np.asarray(embedding_of(t, 4), dtype="float32")) for t in texts()[:3]]


@pytest.mark.parametrize(("change", "words"), [
    ({"kind": "images"}, "kind = 'images' is wrong: it must be chat or embeddings"),
    ({"max_cost_usd": 5.0}, "with price_per_million_tokens set"),
    ({"max_in_flight": 0}, "max_in_flight = 0 is wrong"),
    ({"batchsize": 3}, "'batchsize' is not an option of an API stage"),
    ({"price_per_million_tokens": {"input": 1.0}}, "{prompt: <USD>, completion: <USD>}"),
])
def test_wrong_options_are_refused_where_the_stage_is_declared(change: dict[str, Any],
                                                               words: str) -> None:
    with pytest.raises(ConfigError, match="api_stage 'extracted'") as caught:
        llm.extracted_stage(**change)
    assert words in str(caught.value)


def test_a_missing_api_key_names_the_variable(base: str, server: LlmServer,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LONGRUN_TEST_KEY", raising=False)
    result = dg.materialize(
        [llm.notes, llm.extracted], partition_key=llm.DAY, selection=[llm.extracted.key],
        resources={**llm.resources(base, server.base_url),
                   "llm": llm.ApiEndpoint(base_url="https://api.example.com/v1",
                                          api_key_env="LONGRUN_TEST_KEY")},
        raise_on_error=False)
    assert not result.success
    assert "LONGRUN_TEST_KEY is not set" in failure(result)
    assert server.requests() == []


def test_a_yaml_api_stage_commits_like_the_decorator(base: str, server: LlmServer,
                                                     tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """ApiStageComponent in a defs.yaml: the same asset, fingerprint and answers as the
    decorator (switching reuses the committed partition)."""
    project = tmp_path / "proj"
    pkg = project / "src" / "apiproj" / "defs" / "stage"
    pkg.mkdir(parents=True)
    (project / "pyproject.toml").write_text(
        '[tool.dg]\ndirectory_type = "project"\n\n[tool.dg.project]\nroot_module = "apiproj"\n')
    for folder in (project / "src" / "apiproj", project / "src" / "apiproj" / "defs"):
        (folder / "__init__.py").write_text("")
    (pkg.parent / "upstream.py").write_text("from tests.helpers.llm import notes as notes\n")
    (pkg / "defs.yaml").write_text(textwrap.dedent("""\
        type: longrun_dagster.components.ApiStageComponent
        attributes:
          name: extracted
          model_name: longrun-tiny
          request: tests.helpers.llm.ask
          parse: tests.helpers.llm.parse
          response_model: tests.helpers.llm.Extraction
          upstream: notes
          schema: tests.helpers.llm.Extracted
          partitions: tests.helpers.llm.DAYS
          batch_size: 16
          max_in_flight: 8
          retry_base_seconds: 0.05
          max_bad_fraction: 0.2
        """))
    monkeypatch.syspath_prepend(str(project / "src"))
    defs = dg.load_from_defs_folder(path_within_project=project)
    [yaml_stage] = [a for a in defs.assets or [] if a.key == dg.AssetKey("extracted")]
    first = materialize(base, server, yaml_stage)
    assert first.success and len(server.requests()) == llm.ROWS
    again = materialize(base, server)  # the decorator's stage: same fingerprint
    assert meta(again)["reused"] is True and len(server.requests()) == llm.ROWS
    for module in [m for m in sys.modules if m.startswith("apiproj")]:
        del sys.modules[module]


def batch_log(server: LlmServer) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The batches created and the requests their input files held."""
    return server.requests("/v1/batches"), server.batch_requests()


def test_batch_mode_submits_one_provider_batch_and_commits_its_answers(
        base: str, server: LlmServer) -> None:
    server.set_faults(batch_seconds=0.3, malformed=0.05, bad_request=0.05, seed=2)
    batched = llm.extracted_stage(mode="batch", batch_poll_seconds=0.1)
    result = materialize(base, server, batched)
    assert result.success, failure(result)
    created, inputs = batch_log(server)
    assert len(created) == 1 and len(inputs) == llm.ROWS
    assert server.requests() == []  # nothing went through /v1/chat/completions
    m = meta(result)
    assert m["rows_out"] + m["rows_quarantined"] == llm.ROWS
    malformed, refused = (m.get(f"counts/quarantined/{r}", 0) for r in ("malformed_json",
                                                                         "http_400"))
    assert malformed > 0 and refused > 0  # the error file's rows are quarantined too
    assert malformed + refused == m["rows_quarantined"]
    assert list(committed(base)["id"])[:3] == [f"{llm.DAY}-{i}" for i in range(3)]


def test_an_expired_batch_resubmits_only_its_unanswered_rows(base: str,
                                                             server: LlmServer) -> None:
    server.set_faults(batch_seconds=0.2, batch_expires=1)
    batched = llm.extracted_stage(mode="batch", batch_poll_seconds=0.1)
    result = materialize(base, server, batched)
    assert result.success, failure(result)
    created, inputs = batch_log(server)
    assert len(created) == 2
    assert Counter(r["key"] for r in inputs).most_common(1)[0][1] == 1  # none asked twice
    assert len(inputs) == llm.ROWS and len(committed(base)) == llm.ROWS


def test_batch_mode_survives_a_kill_between_submit_and_completion_without_a_second_batch(
        base: str, server: LlmServer) -> None:
    """kill -9 while the provider batch runs; the relaunch polls the same batch. The
    wait keeps the heartbeat going: a watchdog with a 2 s stall timeout lets an 8 s batch
    finish."""
    server.set_faults(batch_seconds=8.0)
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "LLM_HEARTBEAT": "2",
           "API_OPTIONS": '{"mode": "batch", "batch_poll_seconds": 0.2}'}
    child = subprocess.Popen([sys.executable, "-m", "tests.helpers.llm", base,
                              server.base_url], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not server.requests("/v1/batches") and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert len(server.requests("/v1/batches")) == 1
    relaunch = subprocess.run([sys.executable, "-m", "tests.helpers.llm", base,
                               server.base_url], env=env, capture_output=True, text=True,
                              timeout=120)
    assert "RESULT SUCCESS" in relaunch.stdout, relaunch.stdout[-3000:] + relaunch.stderr[-3000:]
    assert "reconnecting to provider batch" in relaunch.stderr
    assert len(server.requests("/v1/batches")) == 1  # no second submission
    assert len(committed(base)) == llm.ROWS


@pytest.mark.s3
def test_on_s3_answers_are_kept_and_reused_after_a_failed_attempt(
        server: LlmServer, s3_endpoint: str, s3_bucket: str) -> None:
    """The answers journal on a real S3 endpoint (moto on loopback): an attempt that fails
    over its budget keeps its answers; a changed stage (another code version: no
    checkpoint to resume) commits from them without asking again."""
    from dagster_aws.s3 import S3Resource

    io = AtomicObjectStoreIOManager(
        base_uri=f"s3://{s3_bucket}/lr",
        s3=S3Resource(endpoint_url=s3_endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing"))
    resources = {"io_manager": io, "llm": llm.ApiEndpoint(base_url=server.base_url)}
    assert dg.materialize([llm.notes], partition_key=llm.DAY, resources=resources).success
    server.set_faults(truncated=0.5, seed=4)
    strict = llm.extracted_stage(max_bad_fraction=0.0)
    failed = dg.materialize([llm.notes, strict], partition_key=llm.DAY, selection=[strict.key],
                            resources=resources, raise_on_error=False)
    assert not failed.success
    sent = len(server.requests())
    lenient = llm.extracted_stage(max_bad_fraction=0.9, code_version="v2")
    result = dg.materialize([llm.notes, lenient], partition_key=llm.DAY,
                            selection=[lenient.key], resources=resources)
    assert result.success and len(server.requests()) == sent
    m = meta(result)
    assert m["rows_out"] + m["rows_quarantined"] == llm.ROWS
    assert m["counts/quarantined/truncated"] == m["rows_quarantined"] > 0


def test_timeouts_and_dropped_connections_are_retried(base: str, server: LlmServer) -> None:
    server.set_faults(timeout=0.05, hang_seconds=3.0, dropped=0.05, seed=9)
    result = materialize(base, server, timeout_seconds=0.5)
    assert result.success, failure(result)
    log = server.requests()
    assert {"timeout", "dropped"} <= {r["fault"] for r in log}
    m = meta(result)
    assert m["rows_quarantined"] == 0 and len(committed(base)) == llm.ROWS
    assert m["counts/retries"] == sum(r["fault"] in ("timeout", "dropped") for r in log)


@pytest.mark.timeout(120)
def test_rows_that_always_fail_at_the_end_of_a_partition_are_quarantined_not_awaited(
        base: str, server: LlmServer) -> None:
    """The last rows' requests fail every time (a model that crashes on them) after every
    other row was answered. Nothing else is in flight to show the endpoint is up, so
    their rows were parked for good and the stage waited forever; a probe (an answered
    request sent again) tells a poisoned row from an outage."""
    rows = texts()
    server.set_faults(poisoned=tuple(rows[-2:]))
    stingy = llm.extracted_stage(max_retries=1, outage_seconds=30.0)
    result = materialize(base, server, stingy)
    assert result.success, failure(result)
    m = meta(result)
    assert m["counts/quarantined/retries_exhausted"] == 2 == m["rows_quarantined"]
    assert len(committed(base)) == llm.ROWS - 2


def test_rows_with_the_same_request_share_one_answer_counted_once(
        tmp_path: Path, server: LlmServer) -> None:
    @dg.asset(partitions_def=llm.DAYS, name="notes")
    def repeated(context: dg.AssetExecutionContext) -> pd.DataFrame:
        texts = ["red green", "blue cyan magenta", "red green"] * 2
        return pd.DataFrame({"id": [f"{context.partition_key}-{i}" for i in range(6)],
                             "text": texts})

    uri = (tmp_path / "lr").as_uri()
    stage = llm.extracted_stage()
    result = dg.materialize([repeated, stage], partition_key=llm.DAY,
                            resources=llm.resources(uri, server.base_url))
    assert result.success
    assert len(server.requests()) == 2
    m = meta(result)
    assert m["counts/requests"] == 2 and m["rows_out"] == 6
    assert m["counts/prompt_tokens"] == sum(  # the words of both messages, plus 3
        len(t.split()) + len("Answer in JSON.".split()) + 3
        for t in ["red green", "blue cyan magenta"])
    out = committed(uri)
    assert list(out["summary"]) == ["red green", "blue cyan magenta", "red green"] * 2


def test_a_partition_of_refused_requests_is_quarantined_not_an_outage(
        base: str, server: LlmServer) -> None:
    """400s prove the endpoint is up: they never add up to an outage (the partition takes
    ~0.75 s, the outage period is 0.3 s)."""
    server.set_faults(bad_request=1.0, latency_seconds=0.05)
    refused = llm.extracted_stage(outage_seconds=0.3, max_bad_fraction=1.0)
    result = materialize(base, server, refused)
    assert result.success, failure(result)
    assert meta(result)["counts/quarantined/http_400"] == llm.ROWS


@pytest.mark.timeout(120)
def test_a_rate_limit_store_that_cannot_be_reached_fails_the_step_with_its_error(
        base: str, server: LlmServer) -> None:
    """A request task that raised outside the call (here the limiter's store refusing the
    connection) died silently, and the stage waited for its answer forever."""
    result = materialize(base, server, requests_per_minute=100,
                         rate_limit_url="redis://127.0.0.1:9/0")
    assert not result.success
    assert "Connection" in failure(result) or "connect" in failure(result)
    assert server.requests() == []
