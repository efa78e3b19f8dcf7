"""The window of an API stage: up to ``max_in_flight`` requests open at once over the whole
partition (no barrier per batch), each retried by the policy, answers kept in the journal
as they arrive and handed to the stage's loop in input order.

An asyncio loop in a thread of its own sends the requests; the stage's loop (the main
thread) takes answers by row position (``take``), blocking until that row's request is
answered or given up. Requests run at most ``lookahead`` rows ahead of the row taken last,
so a partition's answers are not all held in memory at once.
"""

import asyncio
import json
import random
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from longrun_dagster.api.journal import Journal, Record
from longrun_dagster.api.limits import SharedLimit
from longrun_dagster.api.policy import AdaptiveWindow, Failure, OutageClock, RetryPolicy, failure_of
from longrun_dagster.errors import ApiOutage, CostLimitReached, LongrunError

Call = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
RETRIES_EXHAUSTED = "retries_exhausted"


@dataclass(frozen=True)
class Request:
    key: str
    body: dict[str, Any]
    tokens: int
    """Estimated tokens (prompt and the most the answer may have), for the token limit and
    the cost guard."""


@dataclass(frozen=True)
class Prices:
    """US dollars per million tokens."""

    prompt: float
    completion: float

    def cost(self, usage: dict[str, int]) -> float:
        return (usage.get("prompt_tokens", 0) * self.prompt +
                usage.get("completion_tokens", 0) * self.completion) / 1e6

    def estimate(self, tokens: int) -> float:
        return tokens * max(self.prompt, self.completion) / 1e6


@dataclass
class WindowStats:
    """What this attempt did (not the partition's totals: those are ``stage.count``s)."""

    sent: int = 0
    answered: int = 0
    reused: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    narrowest: int = 0
    batches_submitted: int = 0
    probes: int = 0
    """Answered requests sent again to tell rows that always fail from an outage."""


class Answers:
    """Records by request key, filled by a thread of their own and taken by the stage's
    loop in row order: what ``Window`` (requests in flight) and ``ProviderBatch`` (one
    provider batch) share."""

    def __init__(self, requests: Sequence[Request], *, first: int,
                 restored: dict[str, Record], journal: Journal, where: str) -> None:
        self.requests, self.first, self.journal, self.where = requests, first, journal, where
        self.stats = WindowStats()
        self._results: dict[str, Record] = {}
        self._restored = restored
        self._cv = threading.Condition()
        self._taken = first  # rows before it were taken by the loop
        self._error: BaseException | None = None
        self._stopping = False  # no new request (an error stopped it, or close)
        self._closing = False  # abandon the requests in flight too
        self._drained = False  # the thread has ended: no request is in flight
        self._thread: threading.Thread | None = None

    def take(self, position: int) -> Record:
        """Row ``position``'s record, once its request is answered or given up; the error
        that stopped the answers if it never will be."""
        key = self.requests[position - self.first].key
        with self._cv:
            self._taken = max(self._taken, position + 1)
            self._poke()
            while key not in self._results:
                if self._drained:  # once the requests in flight came back and are kept
                    raise self._error or LongrunError(
                        f"{self.where}: the requests ended without an answer for row "
                        f"{position} (a bug in longrun-dagster; please report it)")
                self._cv.wait(0.5)
            return self._results[key]

    def close(self, drain_seconds: float = 5.0) -> None:
        """Stop sending; give the requests in flight ``drain_seconds`` to come back (their
        answers are paid for: they are kept), abandon the rest, end the thread."""
        self._stopping = True
        self._poke()
        with self._cv:
            self._cv.wait_for(lambda: self._drained, timeout=drain_seconds)
        self._closing = True
        self._poke()
        if self._thread is not None:
            self._thread.join(30)

    def _poke(self) -> None:
        """Wake the thread (the loop took a row, or closes)."""

    def _resolve_restored(self) -> None:
        for request in self.requests:
            kept = self._restored.get(request.key)
            if kept is not None and request.key not in self._results:
                self.stats.reused += 1
                self._resolve(kept)

    def _resolve(self, record: Record) -> None:
        with self._cv:
            self._results[record.key] = record
            self._cv.notify_all()

    def _stop(self, error: BaseException) -> None:
        with self._cv:
            if self._error is None:
                self._error = error
            self._cv.notify_all()
        self._stopping = True

    def _drain(self) -> None:
        with self._cv:
            self._drained = True
            self._cv.notify_all()


class Window(Answers):
    """Send ``requests`` (row positions ``first``.. of the partition) through ``call``."""

    def __init__(self, call: Call, requests: Sequence[Request], *, first: int,
                 restored: dict[str, Record], journal: Journal, max_in_flight: int,
                 policy: RetryPolicy, limit: SharedLimit | None, prices: Prices | None,
                 max_cost_usd: float | None, spent_usd: float, lookahead: int,
                 where: str, aclose: Callable[[], Awaitable[None]] | None = None) -> None:
        super().__init__(requests, first=first, restored=restored, journal=journal,
                         where=where)
        self.call, self.aclose = call, aclose  # aclose: the client's, on its own loop
        self.policy, self.limit = policy, limit
        self.prices, self.max_cost_usd = prices, max_cost_usd
        self.lookahead = lookahead
        self.stats.narrowest = max_in_flight
        self._window = AdaptiveWindow(max_in_flight)
        self._outage = OutageClock(policy.outage_seconds)
        self._rng = random.Random()
        self._spent = spent_usd
        self._reserved = 0.0
        self._not_before = 0.0  # no request before this (monotonic): a Retry-After
        self._parked: list[Record] = []
        self._active = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    # -- the stage's side --------------------------------------------------------------

    def start(self) -> None:
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._wake = asyncio.Event()
            ready.set()
            try:
                self._loop.run_until_complete(self._main())
            except BaseException as exc:  # handed to the stage's loop, which raises it
                self._stop(exc)
            finally:
                try:
                    if self.aclose is not None:
                        self._loop.run_until_complete(self.aclose())
                finally:
                    if self.limit is not None:
                        self.limit.close()
                    self._loop.run_until_complete(self._loop.shutdown_asyncgens())
                    self._loop.close()
                    self._drain()

        self._thread = threading.Thread(target=run, name="longrun-api-window", daemon=True)
        self._thread.start()
        ready.wait()

    def _poke(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # the loop closed meanwhile
                pass

    # -- the loop's side ---------------------------------------------------------------

    async def _main(self) -> None:
        tasks: set[asyncio.Task[None]] = set()
        try:
            await self._send_all(tasks)
        finally:
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _send_all(self, tasks: set[asyncio.Task[None]]) -> None:
        seen = set(self._restored)
        self._resolve_restored()
        for offset, request in enumerate(self.requests):
            if request.key in seen:
                continue
            seen.add(request.key)
            while not self._stopping and (self._active >= self._window.open or
                                          self.first + offset >= self._taken + self.lookahead):
                await self._idle()
            if self._stopping or not await self._affordable(request):
                break
            self._active += 1
            self._reserve(request)
            task = asyncio.create_task(self._one(request))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        while (tasks or self._parked) and not self._closing:  # an error stops new
            await self._idle()                                # requests, not these

    async def _idle(self) -> None:
        """Wait for something to change; with nothing in flight but rows given up while
        nothing was answered (parked), find out whether the endpoint is down."""
        if self._active == 0 and self._parked and not self._stopping:
            await self._probe()
        else:
            await self._sleep_until_woken()

    async def _sleep_until_woken(self) -> None:
        assert self._wake is not None
        try:
            await asyncio.wait_for(self._wake.wait(), 0.5)
        except TimeoutError:
            pass
        self._wake.clear()

    async def _one(self, request: Request) -> None:
        tries, first_failure = 0, None
        try:
            while not self._closing and not (tries and self._stopping):  # no retry once
                # an error stopped the window; a request it admitted is still sent
                delay = self._not_before - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if self.limit is not None:
                    await self.limit.acquire(request.tokens)
                tries += 1
                self.stats.sent += 1
                try:
                    body = await self.call(request.body)
                except Exception as exc:  # noqa: BLE001 - judged by the policy's seam
                    failure = failure_of(exc)
                    if failure is None:  # not the request's failure: a bug, raised
                        self._stop(exc)
                        return
                    first_failure = first_failure or time.monotonic()
                    if self._failed(request, failure, tries, first_failure):
                        return
                    await asyncio.sleep(self.policy.wait(tries, failure, self._rng))
                    continue
                self._answered(Record(request.key, True, body, tries))
                return
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a limiter or bookkeeping error: raised by take()
            self._stop(exc)
        finally:
            self._active -= 1
            self._release(request)
            if self._wake is not None:
                self._wake.set()

    async def _probe(self) -> None:
        """Only given-up requests are left, and nothing was answered since they began
        failing: is the endpoint down (an outage: end the attempt) or are these rows
        what fails (quarantine them)? Send a request that was answered before again; its
        answer settles it. With none to send, only the outage clock can."""
        now = time.monotonic()
        if self._outage.down(now):
            self._stop(ApiOutage(
                f"{self.where}: every request failed for {self.policy.outage_seconds:.0f}s; "
                "the endpoint looks down. Answers so far are kept; run the partition again "
                "to resume once it is back"))
            self._parked.clear()
            return
        known = next((r for r in self._results.values() if r.ok), None)
        body = next((q.body for q in self.requests if known and q.key == known.key), None)
        if body is not None:
            self.stats.sent += 1
            self.stats.probes += 1
            try:
                await self.call(body)
            except Exception as exc:  # noqa: BLE001 - judged by the policy's seam
                failure = failure_of(exc)
                if failure is None:
                    self._stop(exc)
                    return
                self._outage.failed(time.monotonic())
            else:
                self._endpoint_up(time.monotonic())
                return
        await asyncio.sleep(min(self.policy.cap_seconds, max(
            self.policy.base_seconds, self.policy.outage_seconds / 10)))

    def _failed(self, request: Request, failure: Failure, tries: int,
                first_failure: float) -> bool:
        """Count a failed try; True when the request is done with (given up, or the
        endpoint is down)."""
        now = time.monotonic()
        self.stats.failures[failure.kind] = self.stats.failures.get(failure.kind, 0) + 1
        if failure.rate_limited:
            self._window.rate_limited(now)
            self.stats.narrowest = min(self.stats.narrowest, self._window.open)
        if failure.retry_after:
            self._not_before = max(self._not_before, now + failure.retry_after)
        if not failure.retried:  # the endpoint answered (it refused this request): it is
            self._endpoint_up(now)  # up, and rows given up meanwhile are their own fault
        else:
            self._outage.failed(now)
        if self._outage.down(now):
            self._stop(ApiOutage(
                f"{self.where}: every request failed for {self.policy.outage_seconds:.0f}s "
                f"(the last: {failure.kind}, {failure.message}); the endpoint looks down. "
                f"Answers so far are kept; run the partition again to resume once it is "
                f"back ({self.stats.answered} answered in this attempt)"))
            return True
        if not self.policy.gives_up(tries, failure):
            return False
        record = Record(request.key, False, None, tries, failure.status,
                        RETRIES_EXHAUSTED if failure.retried else failure.kind,
                        failure.message)
        if failure.retried and self._outage.last_answer < first_failure:
            self._parked.append(record)  # nothing answered since it began failing: wait
        else:                            # for an answer (then it is this request's fault)
            self._resolve(record)        # or an outage (then nobody's row is quarantined)
        return True

    def _answered(self, record: Record) -> None:
        self._window.answered()
        self.stats.answered += 1
        if self.prices is not None and record.body is not None:
            self._spent += self.prices.cost(_usage(record.body))
        self.journal.add(record)
        self._resolve(record)
        self._endpoint_up(time.monotonic())

    def _endpoint_up(self, now: float) -> None:
        self._outage.answered(now)
        parked, self._parked = self._parked, []
        for one in parked:
            self._resolve(one)

    async def _affordable(self, request: Request) -> bool:
        """Whether the request fits in ``max_cost_usd``, with those in flight at their
        estimates: while some are in flight, wait for their real cost before deciding."""
        if self.max_cost_usd is None or self.prices is None:
            return True
        estimate = self.prices.estimate(request.tokens)
        while self._spent + self._reserved + estimate > self.max_cost_usd:
            if self._active == 0 or self._closing:
                break
            await self._sleep_until_woken()
        else:
            return True
        self._stop(CostLimitReached(
            f"{self.where}: its answers so far cost ${self._spent:.4f} (and ${self._reserved:.4f} "
            f"is in flight); the next request (up to ${estimate:.4f}) would pass max_cost_usd "
            f"= {self.max_cost_usd:g}. Nothing is lost: raise max_cost_usd and run the "
            f"partition again, it resumes with the requests not yet answered",
            spent_usd=self._spent, limit_usd=self.max_cost_usd))
        return False

    def _reserve(self, request: Request) -> None:
        if self.prices is not None:
            self._reserved += self.prices.estimate(request.tokens)

    def _release(self, request: Request) -> None:
        if self.prices is not None:
            self._reserved -= self.prices.estimate(request.tokens)

def _usage(body: dict[str, Any]) -> dict[str, int]:
    usage = body.get("usage") or {}
    return {k: int(usage.get(k) or 0) for k in ("prompt_tokens", "completion_tokens")}


def estimate_tokens(body: dict[str, Any]) -> int:
    """About how many tokens a request may use: ~4 characters of prompt per token, plus the
    most the answer may have (``max_tokens``, else 256)."""
    prompt = len(json.dumps(body.get("messages", body.get("input", "")))) // 4 + 1
    most = body.get("max_completion_tokens") or body.get("max_tokens") or 256
    return prompt + (int(most) if "messages" in body else 0)
