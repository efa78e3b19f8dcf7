"""S3 errors injected at the HTTP level (a fault proxy on loopback in front of the S3
endpoint): 5xx, throttling, connection resets, lost answers, slow responses."""

from pathlib import Path

import boto3
import dagster as dg
import pandas as pd
import pytest
from botocore.config import Config
from dagster_aws.s3 import S3Resource

from longrun_dagster import AtomicObjectStoreIOManager, StorageError
from longrun_dagster.commit import PartitionStore
from longrun_dagster.storage import S3Store
from tests.helpers.s3proxy import FaultProxy, Rule

pytestmark = pytest.mark.s3
MB = 1024 * 1024


def store_via(proxy: FaultProxy, bucket: str, attempts: int = 3) -> S3Store:
    client = boto3.client(
        "s3", endpoint_url=proxy.url, region_name="us-east-1",  # type: ignore[attr-defined]
        aws_access_key_id="testing", aws_secret_access_key="testing",
        config=Config(retries={"max_attempts": attempts, "mode": "standard"},
                      connect_timeout=5, read_timeout=10))
    return S3Store(client, bucket, "lr", multipart_threshold=6 * MB, part_size=5 * MB)


def commit(store: S3Store, data: bytes, run: str = "r1") -> None:
    PartitionStore(store).commit(["a"], "p", {"data": (data, "bin")}, format="bytes",
                                 rows=None, run_id=run)


def read(store: S3Store) -> bytes:
    return bytes(PartitionStore(store).read(["a"], "p")[1])


def manifest_puts(proxy: FaultProxy) -> list[str]:
    return [o for m, t, o in proxy.log if m == "PUT" and "_manifest.json" in t]


@pytest.mark.parametrize("fault", ["500", "503", "reset-before"])
def test_transient_errors_are_retried_and_the_commit_lands(
    proxy: FaultProxy, s3_bucket: str, fault: str
) -> None:
    proxy.rules.append(Rule(fault, method="PUT", path="_manifest.json", times=1))
    proxy.rules.append(Rule(fault, method="PUT", path="/data-", times=1))
    store = store_via(proxy, s3_bucket)
    commit(store, b"x" * 1000)
    assert read(store) == b"x" * 1000
    assert manifest_puts(proxy) == [fault, "ok"]


def test_lost_answer_to_our_own_manifest_put_is_still_our_commit(
    proxy: FaultProxy, s3_bucket: str
) -> None:
    """The manifest PUT landed, its answer was lost, the retry got 412 from our own write:
    that is a commit, not a conflict."""
    proxy.rules.append(Rule("reset-after", method="PUT", path="_manifest.json", times=1))
    store = store_via(proxy, s3_bucket)
    commit(store, b"mine")
    assert read(store) == b"mine"
    assert manifest_puts(proxy) == ["reset-after", "ok"]


def test_persistent_errors_fail_clearly_and_keep_the_previous_version(
    proxy: FaultProxy, s3_bucket: str
) -> None:
    store = store_via(proxy, s3_bucket)
    commit(store, b"old")
    proxy.rules.append(Rule("500", method="PUT", path="_manifest.json"))
    with pytest.raises(StorageError) as err:
        commit(store, b"new", run="r2")
    text = str(err.value)
    assert "s3://" in text and "_manifest.json" in text and "S3 endpoint" in text
    proxy.rules.clear()
    assert read(store) == b"old"


def test_reset_during_a_multipart_upload_aborts_it(
    proxy: FaultProxy, s3_bucket: str, s3_endpoint: str
) -> None:
    """A large write that cannot finish must not leave an unfinished multipart upload."""
    proxy.rules.append(Rule("reset-before", method="PUT", query="partNumber=2"))
    store = store_via(proxy, s3_bucket, attempts=2)
    with pytest.raises(StorageError):
        commit(store, b"y" * (12 * MB))
    direct = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    assert direct.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert PartitionStore(store).lookup(["a"], "p") is None


def test_slow_and_flaky_endpoint_through_the_io_manager(
    proxy: FaultProxy, s3_bucket: str, tmp_path: Path
) -> None:
    proxy.rules += [Rule("500", method="GET", times=1), Rule("503", method="PUT", times=2),
                    Rule("delay", delay=0.05, method="GET")]  # the first matching rule acts
    io = AtomicObjectStoreIOManager(
        base_uri=f"s3://{s3_bucket}/lr",
        s3=S3Resource(endpoint_url=proxy.url, region_name="us-east-1",  # type: ignore[attr-defined]
                      aws_access_key_id="testing", aws_secret_access_key="testing",
                      max_attempts=4))
    days = dg.DailyPartitionsDefinition(start_date="2024-01-01", end_date="2024-01-03")

    @dg.asset(partitions_def=days)
    def rows(context: dg.AssetExecutionContext) -> pd.DataFrame:
        return pd.DataFrame({"day": [context.partition_key] * 3, "x": [1.0, 2.0, 3.0]})

    @dg.asset(partitions_def=days)
    def doubled(rows: pd.DataFrame) -> pd.DataFrame:
        return rows.assign(x=rows.x * 2)

    result = dg.materialize([rows, doubled], partition_key="2024-01-01",
                            resources={"io_manager": io})
    assert result.success
    _, frame = io.partition_store().load(["doubled"], "2024-01-01")
    assert list(frame.x) == [2.0, 4.0, 6.0]
    assert {o for _, _, o in proxy.log} >= {"503", "500", "delay"}
