"""The decisions of an API stage as pure functions (retries, backoff, Retry-After, the
adaptive window, outages), and the rate limit shared by processes, on real buckets."""

import multiprocessing
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest

from longrun_dagster.api.limits import SharedLimit
from longrun_dagster.api.policy import (
    AdaptiveWindow,
    Failure,
    OutageClock,
    RetryPolicy,
    retry_after,
)
from longrun_dagster.errors import ConfigError


@pytest.mark.parametrize(("status", "kind", "retried"), [
    (429, "http_429", True), (408, "http_408", True), (409, "http_409", True),
    (500, "http_500", True), (503, "http_503", True), (None, "timeout", True),
    (None, "connection", True), (400, "http_400", False), (422, "http_422", False),
    (401, "http_401", False), (404, "http_404", False),
])
def test_which_failures_are_retried(status: int | None, kind: str, retried: bool) -> None:
    assert Failure(kind, "x", status).retried is retried


def test_backoff_doubles_with_jitter_is_capped_and_never_undercuts_retry_after() -> None:
    policy = RetryPolicy(max_retries=6, base_seconds=0.5, cap_seconds=4.0)
    rng = random.Random(0)
    plain = Failure("http_500", "x", 500)
    for retry, base in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 4.0)]:
        waits = [policy.wait(retry, plain, rng) for _ in range(200)]
        assert base / 2 <= min(waits) and max(waits) <= base
    told = Failure("http_429", "x", 429, retry_after=7.0)
    assert all(policy.wait(1, told, rng) == 7.0 for _ in range(50))


def test_a_request_is_given_up_after_its_retries_or_at_once_when_not_retried() -> None:
    policy = RetryPolicy(max_retries=2)
    flaky = Failure("http_503", "x", 503)
    assert [policy.gives_up(t, flaky) for t in (1, 2, 3)] == [False, False, True]
    assert policy.gives_up(1, Failure("http_400", "x", 400))


def test_retry_after_reads_seconds_and_http_dates() -> None:
    assert retry_after("3") == 3.0
    assert retry_after("0.25") == 0.25
    now = datetime(2026, 1, 1, tzinfo=UTC)
    later = format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert retry_after(later, now.timestamp()) == pytest.approx(30.0)
    assert retry_after(None) is None and retry_after("soon") is None


def test_the_window_halves_after_a_429_once_per_cooldown_and_grows_back() -> None:
    window = AdaptiveWindow(ceiling=32, cooldown=1.0)
    window.rate_limited(10.0)
    window.rate_limited(10.5)  # the same burst of 429s: one cut
    assert window.open == 16
    window.rate_limited(11.5)
    assert window.open == 8
    for _ in range(2000):
        window.answered()
    assert window.open == 32


def test_an_outage_is_every_try_failing_for_the_whole_period() -> None:
    clock = OutageClock(seconds=10.0)
    clock.failed(0.0)
    assert not clock.down(9.9) and clock.down(10.0)
    clock.answered(10.5)  # one answer: not an outage any more
    clock.failed(11.0)
    assert not clock.down(20.0) and clock.down(21.0)


def _acquire_for(url: str, endpoint: str, seconds: float, out: "multiprocessing.Queue[int]"
                 ) -> None:
    import asyncio

    limit = SharedLimit(4, None, url, endpoint, period_seconds=1)  # 4 a second

    async def run() -> int:
        n, end = 0, time.monotonic() + seconds
        while True:
            await limit.acquire(1)
            if time.monotonic() >= end:
                return n
            n += 1

    out.put(asyncio.run(run()))
    limit.close()


def _shared_count(url: str, processes: int = 3, seconds: float = 3.0) -> int:
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue[int] = ctx.Queue()
    procs = [ctx.Process(target=_acquire_for, args=(url, "http://llm/v1|m", seconds, out))
             for _ in range(processes)]
    for p in procs:
        p.start()
    counts = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    return sum(counts)


def test_a_sqlite_bucket_limits_every_process_on_the_host_together(tmp_path: Path) -> None:
    """Three processes share 4 requests a second for 3 seconds: together they get about
    12 (a window's worth at the start), not three times that."""
    total = _shared_count(f"sqlite:///{tmp_path / 'limits.sqlite'}")
    assert 8 <= total <= 16


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not found")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "--port", str(port), "--save", "", "--dir",
                             str(tmp_path)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait()


def test_a_redis_bucket_limits_processes_together(redis_url: str) -> None:
    total = _shared_count(redis_url)
    assert 8 <= total <= 16


def test_a_wrong_rate_limit_url_names_the_forms_it_takes() -> None:
    with pytest.raises(ConfigError, match="redis://host:6379/0"):
        SharedLimit(10, None, "memcached://x", "e")


@pytest.mark.postgres
def test_a_postgresql_bucket_limits_processes_together(postgres_url: str) -> None:
    url = postgres_url.replace("postgresql+psycopg2://", "postgresql://")
    total = _shared_count(url)
    assert 8 <= total <= 16


def test_a_request_over_a_whole_periods_tokens_waits_for_an_empty_bucket(
        tmp_path: Path) -> None:
    """pyrate-limiter refuses a weight over the bucket's capacity; the refusal was
    ignored and such requests went out unthrottled."""
    import asyncio

    limit = SharedLimit(None, 1000, f"sqlite:///{tmp_path / 'l.sqlite'}", "e",
                        period_seconds=1)

    async def twice() -> float:
        began = time.monotonic()
        await limit.acquire(5000)
        await limit.acquire(5000)
        return time.monotonic() - began

    try:
        assert asyncio.run(twice()) >= 0.8
    finally:
        limit.close()


def test_an_unreadable_retry_after_ms_is_ignored() -> None:
    import httpx2
    import openai

    from longrun_dagster.api.policy import failure_of

    response = httpx2.Response(429, headers={"retry-after-ms": "soon", "retry-after": "2"},
                               request=httpx2.Request("POST", "http://llm/v1/chat"))
    failure = failure_of(openai.RateLimitError("slow down", response=response, body=None))
    assert failure is not None and failure.retry_after == 2.0 and failure.retried
