"""The example pipeline as users run it in production: a partition backfill launched through
dagster-webserver's GraphQL API (the calls the UI makes), executed by a real
`dagster-daemon run` on deploy/dagster.yaml (PostgreSQL, queued runs, pools), committing to
S3 (moto on loopback). Lineage, partition status and the stages' metadata are read back
through the same API; a second backfill must reuse every model stage; and the UI itself,
in headless Chromium, must show the stages and their metadata.

One deployment and one first backfill serve the whole module: the MiniLM runs are the
expensive part.
"""

import functools
import json
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
import pytest
from dagster_aws.s3 import S3Resource

from longrun_dagster import AtomicObjectStoreIOManager
from longrun_dagster import tags as T
from longrun_dagster.recovery import Beat
from tests.conftest import free_port
from tests.helpers.services import Services

DAYS = ["2026-11-01", "2026-11-02"]
LINEAGE = {"records": [], "normalized": ["records"], "extracted": ["normalized"],
           "embeddings": ["extracted"], "quality": ["embeddings"],
           "daily_summary": ["quality"]}
STAGES = ["normalized", "embeddings", "quality"]  # model stages; the rest plain assets
ROWS = 64
BACKFILL_TIMEOUT = 900.0  # 56-99 s alone; 8+ min beside the Celery soak on 2 cores
ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = os.environ.get("LONGRUN_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
pytestmark = [pytest.mark.daemon, pytest.mark.postgres, pytest.mark.s3,
              pytest.mark.timeout(1500)]

METADATA = """fragment Metadata on MaterializationEvent { metadataEntries { label __typename
  ... on BoolMetadataEntry { boolValue } ... on IntMetadataEntry { intValue }
  ... on FloatMetadataEntry { floatValue } ... on TextMetadataEntry { text }
  ... on PathMetadataEntry { path } ... on JsonMetadataEntry { jsonString } } }"""

# What the UI sends from "Materialize..." on partitioned assets (LaunchAssetChoosePartitions
# dialog): an asset backfill with no partition set selector.
LAUNCH_BACKFILL = """mutation LaunchPartitionBackfill($backfillParams: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $backfillParams) {
    __typename
    ... on LaunchBackfillSuccess { backfillId launchedRunIds }
    ... on Error { message }
    ... on PythonError { stack }
  }
}"""

BACKFILL = """query Backfill($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on Error { message }
    ... on PartitionBackfill {
      id status isAssetBackfill numPartitions partitionNames
      error { message stack }
      runs { runId status tags { key value } }
      assetBackfillData { assetBackfillStatuses { __typename
        ... on AssetPartitionsStatusCounts { assetKey { path } numPartitionsTargeted
          numPartitionsInProgress numPartitionsMaterialized numPartitionsFailed } } }
    }
  }
}"""

RUN_EVENTS = """query RunEvents($runId: ID!) {
  runOrError(runId: $runId) { __typename ... on Run { status
    eventConnection { events { __typename
      ... on MessageEvent { message stepKey }
      ... on ExecutionStepFailureEvent { error { message stack } } } } } }
}"""

ASSET_GRAPH = """query AssetGraph {
  assetNodes { assetKey { path } groupName isPartitioned jobNames
    dependencyKeys { path } dependedByKeys { path } }
}"""

ASSET_PARTITIONS = """query AssetPartitions($key: AssetKeyInput!, $partitions: [String!]) {
  assetNodeOrError(assetKey: $key) { __typename
    ... on AssetNode {
      partitionStats { numMaterialized numPartitions numFailed numMaterializing }
      assetPartitionStatuses { __typename
        ... on TimePartitionStatuses { ranges { status startKey endKey } } }
      latestMaterializationByPartition(partitions: $partitions) {
        runId partition ...Metadata }
    }
  }
}
""" + METADATA

CHECKS = """query Checks($key: AssetKeyInput!) {
  assetNodeOrError(assetKey: $key) { __typename
    ... on AssetNode { assetChecksOrError { __typename
      ... on AssetChecks { checks { name partitionDefinition { description }
        partitionStatuses { __typename
          ... on AssetCheckTimePartitionStatuses { ranges { status startKey endKey } } } } } } }
  }
}"""

FINISHED = {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}


def new_database(server: Any) -> str:
    """A fresh database on the session's PostgreSQL server, as a psycopg2 SQLAlchemy URL."""
    import psycopg2

    name = f"ui_{uuid.uuid4().hex[:12]}"
    conn = psycopg2.connect(server.get_uri("postgres"))
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name}")
    finally:
        conn.close()
    return str(server.get_uri(name)).replace("postgresql://", "postgresql+psycopg2://", 1)


@pytest.fixture(scope="module")
def deployment(postgres_server: Any, s3_endpoint: str,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    """deploy/dagster.yaml on PostgreSQL; webserver and daemon load workspace.yaml with the
    example's storage on the loopback S3 bucket; pool "gpu" gets one slot (through GraphQL,
    as the UI's concurrency page sets it)."""
    bucket = f"ui-{uuid.uuid4().hex[:12]}"
    s3(s3_endpoint).create_bucket(Bucket=bucket)
    env = {"DAGSTER_PG_URL": new_database(postgres_server),
           "LONGRUN_BASE_URI": f"s3://{bucket}/prefix", "AWS_ENDPOINT_URL_S3": s3_endpoint,
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "LONGRUN_EXAMPLE_ROWS": str(ROWS),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    services = Services(tmp_path_factory.mktemp("deployment") / "home", free_port(), env)
    with pytest.MonkeyPatch.context() as mp:  # migrate once, before two processes race to
        mp.setenv("DAGSTER_PG_URL", env["DAGSTER_PG_URL"])
        import dagster as dg

        with dg.DagsterInstance.from_config(str(services.home)) as instance:
            assert type(instance.run_storage).__name__ == "PostgresRunStorage"
    services.start_webserver()
    services.start_daemon()
    try:
        wait_for_code_location(services)
        assert services.graphql('mutation { setConcurrencyLimit(concurrencyKey: "gpu", '
                                'limit: 1) }')["setConcurrencyLimit"] is True
        pool = services.graphql('{ instance { concurrencyLimit(concurrencyKey: "gpu") '
                                '{ slotCount } } }')
        assert pool["instance"]["concurrencyLimit"]["slotCount"] == 1
        yield services
    finally:
        services.stop()
        services.keep_logs(ARTIFACTS / "webserver-deployment")


def s3(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def wait_for_code_location(services: Services) -> None:
    query = """{ workspaceOrError { __typename ... on Workspace { locationEntries {
      name loadStatus locationOrLoadError { __typename
        ... on PythonError { message stack } } } } } }"""

    def loaded() -> bool:
        entries = services.graphql(query, timeout=10)["workspaceOrError"]["locationEntries"]
        for entry in entries:
            error = entry["locationOrLoadError"]
            if error and error["__typename"] == "PythonError":
                raise AssertionError(f"code location {entry['name']} failed to load: "
                                     f"{error['message']}\n{error['stack']}")
        return bool(entries) and all(e["loadStatus"] == "LOADED" for e in entries)

    services.wait_until(loaded, 180, "the webserver to load the code location")


def run_failures(services: Services, runs: list[dict[str, Any]]) -> str:
    """The last events of every run that did not succeed, errors included."""
    lines = []
    for run in runs:
        if run["status"] == "SUCCESS":
            continue
        got = services.graphql(RUN_EVENTS, {"runId": run["runId"]})["runOrError"]
        lines.append(f"run {run['runId']} {run['status']}:")
        for event in got.get("eventConnection", {}).get("events", [])[-15:]:
            error = event.get("error")
            lines.append(f"  {event['__typename']} {event.get('stepKey')} "
                         f"{(event.get('message') or '')[:300]!r}"
                         + (f"\n{error['message']}{error['stack']}"[:2000] if error else ""))
    return "\n".join(lines)


def backfill(services: Services, run_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Launch a backfill of the whole group over DAYS as the UI does; wait for it to end."""
    started = time.monotonic()
    params: dict[str, Any] = {
        "selector": None, "assetSelection": [{"path": [key]} for key in LINEAGE],
        "partitionNames": DAYS, "fromFailure": False, "tags": []}
    if run_config is not None:  # what the launchpad adds
        params["runConfigData"] = run_config
    launched = services.graphql(LAUNCH_BACKFILL, {"backfillParams": params})[
        "launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    backfill_id = launched["backfillId"]
    result: dict[str, Any] = services.wait_until(
        functools.partial(backfill_finished, services, backfill_id), BACKFILL_TIMEOUT,
        f"backfill {backfill_id} to finish", every=2.0)
    result["elapsed"] = time.monotonic() - started
    runs = result["runs"]
    if result["status"] != "COMPLETED_SUCCESS" or not runs or any(
            r["status"] != "SUCCESS" for r in runs):
        raise AssertionError(
            f"backfill {backfill_id} ended {result['status']}: {json.dumps(result)[:3000]}\n"
            f"{run_failures(services, runs)}\n{services.logs()}")
    print(f"backfill {backfill_id}: {len(DAYS)} partitions x {len(LINEAGE)} assets, "
          f"{len(runs)} runs, {result['elapsed']:.1f}s from launch to COMPLETED_SUCCESS"
          + (f" (run config {json.dumps(run_config)})" if run_config else ""))
    return result


def metadata(event: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for entry in event["metadataEntries"]:
        values = [v for k, v in entry.items() if k not in ("label", "__typename")]
        out[entry["label"]] = values[0] if values else None
    return out


def latest(services: Services, asset: str) -> dict[str, Any]:
    node: dict[str, Any] = services.graphql(ASSET_PARTITIONS, {
        "key": {"path": [asset]}, "partitions": DAYS})["assetNodeOrError"]
    assert node["__typename"] == "AssetNode", node
    return node


@pytest.fixture(scope="module")
def first_backfill(deployment: Services) -> dict[str, Any]:
    return backfill(deployment)


def test_backfill_through_graphql_commits_every_partition_to_s3(
    deployment: Services, first_backfill: dict[str, Any], s3_endpoint: str
) -> None:
    assert first_backfill["isAssetBackfill"] and first_backfill["numPartitions"] == len(DAYS)
    statuses = {tuple(s["assetKey"]["path"]): s for s in
                first_backfill["assetBackfillData"]["assetBackfillStatuses"]}
    assert set(statuses) == {(key,) for key in LINEAGE}
    for status in statuses.values():
        assert (status["numPartitionsTargeted"], status["numPartitionsMaterialized"],
                status["numPartitionsFailed"]) == (len(DAYS), len(DAYS), 0), status
    backfill_runs = {r["runId"] for r in first_backfill["runs"]}

    nodes = {tuple(n["assetKey"]["path"]): n for n in
             deployment.graphql(ASSET_GRAPH)["assetNodes"]}
    for asset, parents in LINEAGE.items():
        node = nodes[(asset,)]
        assert node["groupName"] == "annotation" and node["isPartitioned"], node
        assert [k["path"] for k in node["dependencyKeys"]] == [[p] for p in parents], node
        children = [a for a, ps in LINEAGE.items() if asset in ps]
        assert [k["path"] for k in node["dependedByKeys"]] == [[c] for c in children], node
        assert "annotation" in node["jobNames"]

    store = AtomicObjectStoreIOManager(
        base_uri=deployment.env["LONGRUN_BASE_URI"],
        s3=S3Resource(endpoint_url=s3_endpoint)).partition_store()
    for asset in LINEAGE:
        node = latest(deployment, asset)
        assert node["partitionStats"] == {"numMaterialized": len(DAYS), "numPartitions":
                                          node["partitionStats"]["numPartitions"],
                                          "numFailed": 0, "numMaterializing": 0}, node
        ranges = node["assetPartitionStatuses"]["ranges"]
        assert [(r["status"], r["startKey"], r["endKey"]) for r in ranges] == [
            ("MATERIALIZED", DAYS[0], DAYS[-1])], (asset, ranges)
        for day, event in zip(DAYS, node["latestMaterializationByPartition"], strict=True):
            meta = metadata(event)
            assert event["partition"] == day and event["runId"] in backfill_runs
            assert meta["reused"] is False and meta["committed_by_run"] == event["runId"]
            manifest = store.lookup([asset], day)  # the S3 bucket holds what the UI shows
            assert manifest is not None and manifest.run_id == event["runId"], (asset, day)
            assert meta["content_version"] == manifest.data_version, (asset, day, meta)
            assert meta["data_objects"] == len(manifest.objects_of("data")) >= 1
            assert meta["uri"] == store.uri([asset], day) and meta["uri"].startswith("s3://")
            store.verify(manifest)
            if asset in STAGES:
                assert meta["rows_in"] == meta["rows_out"] + meta["rows_quarantined"], meta
                assert meta["rows_out"] == meta["rows"] and meta["model_calls"] >= 1, meta
                assert meta["vram_backend"] in ("nvml", "torch", "host"), meta
                assert meta["vram_peak_mb"] > 0, meta

    bucket = deployment.env["LONGRUN_BASE_URI"][len("s3://"):].split("/", 1)[0]
    listed = s3(s3_endpoint).list_objects_v2(Bucket=bucket)
    manifests = sorted(o["Key"] for o in listed.get("Contents", [])
                       if o["Key"].endswith("/_manifest.json"))
    assert manifests == sorted(  # s3://bucket/prefix/<asset>/<partition folder>
        store.uri([asset], day).split("/", 3)[3] + "/_manifest.json"
        for asset in LINEAGE for day in DAYS), manifests


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's Chromium (never a browser `playwright install` downloads); checked before
    the deployment starts, so a machine without it fails in a second, saying what to do."""
    if os.environ.get("LONGRUN_SKIP_UI") == "1":
        pytest.skip("LONGRUN_SKIP_UI=1")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"no Chromium at {CHROMIUM}: install it (`apt-get install chromium` on "
                    "Debian; ./scripts/test does this when it runs as root), point "
                    "LONGRUN_CHROMIUM at one, or set LONGRUN_SKIP_UI=1 to skip this test")
    return CHROMIUM


@contextmanager
def browser(chromium: str, failure: str) -> Iterator[tuple[Any, Callable[..., None]]]:
    """A headless Chromium page on the webserver, and ``visible(text, exact=False)``; a
    failure saves ``failure`` (a screenshot) and says what the page showed."""
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.set_default_timeout(60_000)
        # A first visit gets a "Join the Dagster community" dialog over the page: skip it.
        page.add_locator_handler(page.get_by_text("Join the Dagster community"),
                                 lambda: page.get_by_role("button", name="Skip").click())

        def visible(text: str, exact: bool = False) -> None:
            expect(page.get_by_text(text, exact=exact).first).to_be_visible(timeout=60_000)

        try:
            yield page, visible
        except Exception as exc:
            page.screenshot(path=ARTIFACTS / failure, full_page=True)
            raise AssertionError(f"{exc}\npage {page.url} says:\n"
                                 f"{page.inner_text('body')[:3000]}") from exc
        finally:
            browser.close()


def test_ui_shows_the_stages_and_their_metadata(
    chromium: str, deployment: Services, first_backfill: dict[str, Any]
) -> None:
    with browser(chromium, "ui-failure.png") as (page, visible):
        page.goto(f"{deployment.url}/asset-groups/annotation")
        for asset in LINEAGE:
            visible(asset, exact=True)
        page.screenshot(path=ARTIFACTS / "asset-graph.png")

        page.goto(f"{deployment.url}/assets/quality?view=partitions&partition={DAYS[-1]}")
        visible(f"Materialized ({len(DAYS)})")  # the status filter's count
        visible("Materialized", exact=True)  # the selected partition's status
        for label in ("rows_quarantined", "vram_peak_mb", "committed_by_run",
                      "dagster/row_count"):
            visible(label, exact=True)  # the partition's materialization metadata
        page.screenshot(path=ARTIFACTS / "quality-partition.png", full_page=True)

        # the overview's Columns section: the pandera schema's columns, types and checks
        page.goto(f"{deployment.url}/assets/quality")
        visible("Columns", exact=True)
        for text in ("string[pyarrow]", "float64", "unique", "greater_than_or_equal_to(0.0)",
                     "less_than_or_equal_to(1.0)"):  # Scored's id and quality
            visible(text, exact=True)
        visible("PyTorch", exact=True)  # kinds: [pytorch] in its defs.yaml
        page.screenshot(path=ARTIFACTS / "quality-columns.png", full_page=True)


def test_ui_shows_one_check_verdict_per_partition(
    deployment: Services, first_backfill: dict[str, Any]
) -> None:
    """The schema check was not partitioned: GraphQL showed partitionDefinition null, and
    the UI one verdict for all days (the latest partition's)."""
    for stage in STAGES:
        node = deployment.graphql(CHECKS, {"key": {"path": [stage]}})["assetNodeOrError"]
        [check] = [c for c in node["assetChecksOrError"]["checks"]
                   if c["name"] == "schema_valid_rows"]
        assert check["partitionDefinition"] is not None, (stage, check)
        ranges = check["partitionStatuses"]["ranges"]
        assert [(r["status"], r["startKey"], r["endKey"]) for r in ranges] == [
            ("SUCCEEDED", DAYS[0], DAYS[-1])], (stage, ranges)


def test_second_backfill_reuses_every_model_stage(
    deployment: Services, first_backfill: dict[str, Any], s3_endpoint: str
) -> None:
    """The same backfill again, with the in-process executor chosen in its run config: the
    first backfill covered the production executor (a process per step); reuse does not
    depend on it, and on 2 cores the step processes, not the models, cost most of a
    backfill of committed partitions (~80 s of ~85 s measured)."""
    before = {stage: latest(deployment, stage)["latestMaterializationByPartition"]
              for stage in STAGES}
    second = backfill(deployment, {"execution": {"config": {"in_process": {}}}})
    runs = {r["runId"] for r in second["runs"]}
    for stage in STAGES:
        node = latest(deployment, stage)
        for day, event, old in zip(DAYS, node["latestMaterializationByPartition"],
                                   before[stage], strict=True):
            meta = metadata(event)
            assert event["partition"] == day and event["runId"] in runs, event
            assert meta["reused"] is True, (stage, day, meta)  # the computing run's figures:
            assert meta["model_calls"] == metadata(old)["model_calls"] > 0, (stage, day, meta)
            assert meta["vram_peak_mb"] == metadata(old)["vram_peak_mb"] > 0, (stage, day)
            assert meta["committed_by_run"] == old["runId"], (stage, day, meta)
        assert node["partitionStats"]["numMaterialized"] == len(DAYS)
    print(f"second backfill (model stages reused): {second['elapsed']:.1f}s "
          f"vs first {first_backfill['elapsed']:.1f}s")


def test_ui_after_the_reuse_backfill_plots_every_partition(
    chromium: str, deployment: Services, first_backfill: dict[str, Any]
) -> None:
    """The Plots tab draws a stage's figures per partition from each partition's latest
    materialization: after the reuse backfill that is the reuse, carrying the computing
    run's figures (no zeros)."""
    for stage in STAGES:
        events = latest(deployment, stage)["latestMaterializationByPartition"]
        values = [metadata(e)["vram_peak_mb"] for e in events]
        if stage == "embeddings":  # what fn counted (stage.count), per partition
            counted = [metadata(e)["counts/characters"] for e in events]
            assert all(c > 0 for c in counted), counted
        assert all(metadata(e)["reused"] for e in events), (stage, events)
        assert len(values) == len(DAYS) and all(v > 0 for v in values), (stage, values)
    with browser(chromium, "ui-plots-failure.png") as (page, visible):
        page.goto(f"{deployment.url}/assets/embeddings")  # Overview, Metadata, Plots
        page.get_by_text("Plots", exact=True).first.click()
        visible("When graphing values by partition", exact=False)  # x axis: partitions
        for label in ("vram_peak_mb", "rows_quarantined", "model_calls", "counts/characters"):
            visible(label, exact=True)  # one chart per numeric metadata entry
        page.screenshot(path=ARTIFACTS / "embeddings-plots.png", full_page=True)


def test_ui_shows_a_running_stages_progress(
    chromium: str, deployment: Services, first_backfill: dict[str, Any]
) -> None:
    """A stage caught running: its step process is frozen (SIGSTOP) as soon as its
    heartbeat names it, so the run stays STARTED while the UI is read, then resumed; the
    run page shows the longrun/progress tag. Days after DAYS, one per try (a try whose
    stage finished before it was caught goes on to the next day). (The runs list shows
    the same tag, for runs outside backfills.)"""
    for day in ["2026-11-03", "2026-11-04", "2026-11-05"]:
        launched = deployment.graphql(LAUNCH_BACKFILL, {"backfillParams": {
            "selector": None, "assetSelection": [{"path": [k]} for k in STAGES[:2]]
            + [{"path": ["records"]}, {"path": ["extracted"]}], "partitionNames": [day],
            "fromFailure": False,
            "tags": []}})["launchPartitionBackfill"]
        assert launched["__typename"] == "LaunchBackfillSuccess", launched
        caught = catch_a_running_stage(deployment, launched["backfillId"])
        if caught is None:
            continue
        run_id, pid, progress = caught
        try:
            with browser(chromium, "ui-progress-failure.png") as (page, visible):
                page.goto(f"{deployment.url}/runs/{run_id}")
                page.get_by_text("View tags and config", exact=True).first.click()
                visible(f"{T.PROGRESS}: {progress}")
                page.screenshot(path=ARTIFACTS / "running-stage-progress.png")
        finally:
            os.kill(pid, signal.SIGCONT)
        done = deployment.wait_until(
            functools.partial(backfill_finished, deployment, launched["backfillId"]),
            BACKFILL_TIMEOUT, "the frozen stage's backfill to finish after SIGCONT", every=2.0)
        assert done["status"] == "COMPLETED_SUCCESS", run_failures(deployment, done["runs"])
        return
    pytest.fail("three stage runs ended before their heartbeat was seen (polled every "
                "0.1 s); the machine is too loaded for this test")


def backfill_finished(services: Services, backfill_id: str) -> dict[str, Any] | None:
    got: dict[str, Any] = services.graphql(BACKFILL, {"id": backfill_id})[
        "partitionBackfillOrError"]
    assert got["__typename"] == "PartitionBackfill", got
    return got if got["status"] in FINISHED else None


def catch_a_running_stage(services: Services, backfill_id: str
                          ) -> tuple[str, int, str] | None:
    """(run id, pid, progress tag) of a stage step frozen while its run is STARTED; None
    if the backfill ended first."""
    deadline = time.monotonic() + BACKFILL_TIMEOUT
    while time.monotonic() < deadline:
        got = services.graphql(BACKFILL, {"id": backfill_id})["partitionBackfillOrError"]
        for run in got["runs"]:
            found = {t["key"]: t["value"] for t in run["tags"]}
            beat = T.last_beat(T.own(found, run["runId"], None))
            if run["status"] != "STARTED" or not beat or T.PROGRESS not in found:
                continue
            decoded = Beat.decode(beat)
            if decoded is None or decoded.ended or decoded.process is None:
                continue
            os.kill(decoded.process.pid, signal.SIGSTOP)
            # frozen now: was it still inside the stage when it stopped?
            [now] = [r for r in services.graphql(BACKFILL, {"id": backfill_id})[
                "partitionBackfillOrError"]["runs"] if r["runId"] == run["runId"]]
            tags_now = {t["key"]: t["value"] for t in now["tags"]}
            beat_now = Beat.decode(T.last_beat(T.own(tags_now, run["runId"], None)))
            if now["status"] == "STARTED" and beat_now is not None and not beat_now.ended \
                    and not tags_now[T.PROGRESS].endswith("ended"):
                return run["runId"], decoded.process.pid, tags_now[T.PROGRESS]
            os.kill(decoded.process.pid, signal.SIGCONT)
        if got["status"] in FINISHED:
            return None
        time.sleep(0.1)
    raise AssertionError(f"backfill {backfill_id} did not finish")


def test_the_queries_match_the_installed_graphql_schema() -> None:
    """The diagnostics' queries run only when something failed: check them all now."""
    from dagster_graphql.schema import create_schema
    from graphql import parse, validate

    schema = create_schema().graphql_schema
    for query in (LAUNCH_BACKFILL, BACKFILL, RUN_EVENTS, ASSET_GRAPH, ASSET_PARTITIONS,
                  CHECKS):
        assert validate(schema, parse(query)) == [], query
