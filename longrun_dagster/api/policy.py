"""Retry decisions for API requests, as pure functions of plain values: which failures are
retried, how long to wait, when a stream of failures is an outage.

The seam that turns the ``openai`` SDK's exceptions into a ``Failure`` is ``failure_of``;
everything else here knows nothing of HTTP clients.
"""

import email.utils
import random
import time
from dataclasses import dataclass

RETRIED_STATUSES = frozenset({408, 409, 429})
"""Besides every 5xx; 400, 422 and the other 4xx are the request's fault: not retried."""


@dataclass(frozen=True)
class Failure:
    """One failed try of a request."""

    kind: str
    """``http_<status>``, ``timeout`` or ``connection``."""
    message: str
    status: int | None = None
    retry_after: float | None = None
    """Seconds the server asked the client to wait (``Retry-After``), if it said."""

    @property
    def retried(self) -> bool:
        if self.status is None:
            return True  # timeouts and dropped connections
        return self.status in RETRIED_STATUSES or self.status >= 500

    @property
    def rate_limited(self) -> bool:
        return self.status == 429


@dataclass(frozen=True)
class RetryPolicy:
    """How a request is retried: up to ``max_retries`` times after its first try, waiting
    ``base * 2**n`` seconds (capped at ``cap``) with full jitter, and never less than
    the server's ``Retry-After``."""

    max_retries: int = 6
    base_seconds: float = 0.5
    cap_seconds: float = 30.0
    outage_seconds: float = 120.0

    def wait(self, retry: int, failure: Failure, rng: random.Random) -> float:
        """Seconds before retry number ``retry`` (1 = the first retry)."""
        backoff = min(self.cap_seconds, self.base_seconds * 2 ** (retry - 1))
        jittered = float(backoff) * (0.5 + rng.random() / 2)
        return max(jittered, failure.retry_after or 0.0)

    def gives_up(self, tries: int, failure: Failure) -> bool:
        """Whether a request that failed ``tries`` times, the last with ``failure``, is
        given up (its row quarantined)."""
        return not failure.retried or tries > self.max_retries


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """A ``Retry-After`` header (seconds, or an HTTP date) as seconds from now."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def failure_of(exc: BaseException) -> Failure | None:
    """The ``Failure`` an ``openai`` SDK exception stands for (None: not a request failure,
    such as a bug in user code, which propagates)."""
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return Failure("timeout", "the request timed out")
    if isinstance(exc, openai.APIConnectionError):
        return Failure("connection", f"connection failed: {exc}")
    if isinstance(exc, openai.APIStatusError):
        headers = exc.response.headers
        wait = _milliseconds(headers.get("retry-after-ms"))
        return Failure(f"http_{exc.status_code}", _message(exc), exc.status_code,
                       wait if wait is not None else retry_after(headers.get("retry-after")))
    if isinstance(exc, InvalidResponse):
        return Failure("invalid_response", str(exc))
    return None


class InvalidResponse(Exception):  # noqa: N818 - a response, not an error of ours
    """A 200 whose body is not the JSON object an OpenAI-compatible server sends (a proxy's
    HTML page, a cut connection): retried like a dropped connection."""


def _milliseconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value) / 1000) if value else None
    except ValueError:
        return None


def _message(exc: BaseException) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])[:500]
    return str(exc)[:500]


@dataclass
class OutageClock:
    """When every try has failed for ``seconds``, the endpoint is down (an outage), as
    opposed to some requests failing while others are answered."""

    seconds: float
    failing_since: float | None = None
    last_answer: float = 0.0

    def answered(self, now: float) -> None:
        self.failing_since, self.last_answer = None, now

    def failed(self, now: float) -> None:
        if self.failing_since is None:
            self.failing_since = now

    def down(self, now: float) -> bool:
        return self.failing_since is not None and now - self.failing_since >= self.seconds


@dataclass
class AdaptiveWindow:
    """How many requests may be in flight: ``limit`` halves after a 429 (at most once per
    ``cooldown`` seconds) and grows back by one per ``limit`` answers, up to ``ceiling``."""

    ceiling: int
    cooldown: float = 1.0
    limit: float = 0.0
    _cut_at: float = -1e18

    def __post_init__(self) -> None:
        self.limit = float(self.ceiling)

    def rate_limited(self, now: float) -> None:
        if now - self._cut_at >= self.cooldown:
            self.limit, self._cut_at = max(1.0, self.limit / 2), now

    def answered(self) -> None:
        self.limit = min(float(self.ceiling), self.limit + 1.0 / max(self.limit, 1.0))

    @property
    def open(self) -> int:
        return max(1, int(self.limit))
