"""A rate limit shared by every process that calls one endpoint: requests and tokens per
minute, kept in a pyrate-limiter bucket (SQLite on one host; Redis or PostgreSQL across
hosts).

Tokens are counted in units (``token_unit`` tokens each) so that a bucket holds at most
about 10,000 entries a minute whatever the token rate: pyrate-limiter's log buckets store
one row per unit of weight.
"""

import asyncio
import hashlib
import math
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from longrun_dagster.errors import ConfigError, LongrunError


def default_url() -> str:
    """Where a single host keeps its buckets: beside the Dagster instance, else in /tmp."""
    home = os.environ.get("DAGSTER_HOME") or tempfile.gettempdir()
    return f"sqlite:///{os.path.join(home, 'longrun-rate-limits.sqlite')}"


@dataclass
class SharedLimit:
    """``acquire(tokens)`` waits until one more request of ``tokens`` tokens fits in both
    per-minute limits, shared through the buckets at ``url``."""

    requests_per_minute: int | None
    tokens_per_minute: int | None
    url: str
    endpoint: str
    """Names the buckets: every stage calling the same endpoint shares them."""
    period_seconds: int = 60
    """The limits are per this many seconds (a minute; tests use less)."""

    def __post_init__(self) -> None:
        from pyrate_limiter import Duration, Limiter, Rate

        self._pool = ThreadPoolExecutor(1, thread_name_prefix="longrun-rate-limit")
        name = "lr_" + hashlib.sha256(self.endpoint.encode()).hexdigest()[:12]
        self._limiters: list[tuple[Any, int, int]] = []  # (limiter, tokens per unit (0:
        # requests), units per period)
        self.token_unit = max(1, math.ceil((self.tokens_per_minute or 0) / 10_000))
        for suffix, per_minute, unit in (("r", self.requests_per_minute, 0),
                                         ("t", self.tokens_per_minute, self.token_unit)):
            if per_minute:
                units = per_minute if unit == 0 else max(1, per_minute // unit)
                rate = Rate(units, Duration.SECOND * self.period_seconds)
                bucket = _bucket(self.url, f"{name}_{suffix}", [rate])
                self._limiters.append((Limiter(bucket), unit, units))

    @property
    def active(self) -> bool:
        return bool(self._limiters)

    async def acquire(self, tokens: int) -> None:
        # blocking acquires, one at a time in a thread of their own (first come, first
        # served): pyrate-limiter's non-blocking path cannot take its file lock under
        # filelock 4 (it passes False as the timeout)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._pool, self._acquire, tokens)

    def _acquire(self, tokens: int) -> None:
        for limiter, unit, capacity in self._limiters:
            # a request bigger than a whole period's tokens waits for an empty bucket
            # (pyrate-limiter refuses a weight over the capacity outright)
            weight = 1 if unit == 0 else min(capacity, max(1, math.ceil(tokens / unit)))
            if not limiter.try_acquire("request", weight=weight):
                raise LongrunError(f"rate limit bucket {self.url} refused a request of "
                                   f"weight {weight}")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for limiter, _, _ in self._limiters:
            limiter.close()


def _bucket(url: str, table: str, rates: list[Any]) -> Any:
    from pyrate_limiter import SQLiteBucket

    scheme = urlparse(url).scheme
    if scheme == "sqlite":
        path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else ""
        if not path:
            raise ConfigError(f"rate_limit_url = {url!r} is wrong: a SQLite bucket needs a "
                              "file, sqlite:////abs/path/limits.sqlite")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return SQLiteBucket.init_from_file(rates, table=table, db_path=path,
                                           create_new_table=True, use_file_lock=True)
    if scheme in ("redis", "rediss"):
        import redis
        from pyrate_limiter import RedisBucket

        return RedisBucket.init(rates, redis.Redis.from_url(url), table)
    if scheme in ("postgresql", "postgres"):
        try:
            from psycopg_pool import ConnectionPool
        except ImportError as exc:
            raise ConfigError(f"rate_limit_url = {url!r} needs psycopg and psycopg-pool: "
                              "pip install 'psycopg[binary]' psycopg-pool") from exc
        from pyrate_limiter import PostgresBucket

        return PostgresBucket(ConnectionPool(url, open=True), table, rates)
    raise ConfigError(f"rate_limit_url = {url!r} is wrong: use sqlite:////path/file.sqlite "
                      "(one host), redis://host:6379/0 or postgresql://user@host/db (several "
                      "hosts)")
