"""``api_stage``: a model stage whose model sits behind an OpenAI-compatible endpoint.

The stage is a ``model_stage`` (partitions, pandera, quarantine and budget, fingerprint and
reuse, claim and commit, checkpoints, heartbeats); what it maps over the partition is an
``ApiWork``, which opens a ``Window`` over all of a partition's rows: requests stay in
flight across batch boundaries, and each batch takes its rows' answers in order, checks
and parses them. (No ``from __future__ import annotations``: see ``stage``.)
"""

import contextlib
import hashlib
import inspect
import ipaddress
import json
import os
from collections.abc import Callable, Generator, Mapping
from typing import Any
from urllib.parse import urlparse

import dagster as dg
import pandas as pd
import pydantic
from pydantic import Field

from longrun_dagster import fingerprint
from longrun_dagster.api.answer import (
    CHAT,
    EMBEDDINGS,
    PARSE_ERROR,
    Answer,
    BadAnswer,
    default_parse,
)
from longrun_dagster.api.journal import Journal, Record
from longrun_dagster.api.limits import SharedLimit, default_url
from longrun_dagster.api.policy import InvalidResponse, RetryPolicy
from longrun_dagster.api.provider_batch import ProviderBatch
from longrun_dagster.api.window import Answers, Prices, Request, Window, estimate_tokens
from longrun_dagster.batches import Answered
from longrun_dagster.errors import ConfigError
from longrun_dagster.options import ApiOptions, StageOptions
from longrun_dagster.stage import StageContext, declare
from longrun_dagster.validation import as_schema, empty_frame

RequestFn = Callable[[dict[str, Any], StageContext], Any]
ParseFn = Callable[[Answer, dict[str, Any], StageContext], Any]


class ApiEndpoint(dg.ConfigurableResource):  # type: ignore[type-arg]
    """An OpenAI-compatible endpoint (vLLM, SGLang, a hosted engine, OpenAI) and the rate
    limits every run calling it shares. The API key is read from the environment variable
    named by ``api_key_env`` when a request is sent; it is never part of the config the
    UI shows."""

    base_url: str | None = Field(
        default=None, description="The endpoint's /v1 URL, e.g. http://vllm:8000/v1. "
        "Unset: LONGRUN_LLM_BASE_URL, else OPENAI_BASE_URL (where the run executes), else "
        "OpenAI's.")
    embedded_fallback: bool = Field(
        default=False, description="With no URL set anywhere, start longrun's "
        "deterministic test server (longrun_dagster.llm_server) on loopback in the step's "
        "process and call it: for examples and tests, never for production.")
    api_key_env: str = Field(
        default="OPENAI_API_KEY", description="Name of the environment variable that holds "
        "the API key (not the key). A loopback endpoint needs none.")
    timeout_seconds: float = Field(
        default=120.0, description="Seconds before a request counts as timed out (retried).")
    requests_per_minute: int | None = Field(
        default=None, description="Requests per minute to this endpoint, shared by every "
        "process using the same rate_limit_url. Unset: no limit.")
    tokens_per_minute: int | None = Field(
        default=None, description="Tokens per minute (prompt estimate plus max_tokens), "
        "shared like requests_per_minute. Unset: no limit.")
    rate_limit_url: str | None = Field(
        default=None, description="Where the shared limits live: sqlite:////path/file "
        "(one host; default: $DAGSTER_HOME/longrun-rate-limits.sqlite), redis://host:6379/0 "
        "or postgresql://user@host/db (several hosts).")

    def url(self) -> str | None:
        found = (self.base_url or os.environ.get("LONGRUN_LLM_BASE_URL")
                 or os.environ.get("OPENAI_BASE_URL"))
        if found is None and self.embedded_fallback:
            return _embedded_server()
        return found

    def api_key(self) -> str:
        key = os.environ.get(self.api_key_env)
        if key:
            return key
        if _loopback(self.url()):
            return "unused"  # a local test or vLLM server without --api-key
        raise ConfigError(
            f"ApiEndpoint({self.url() or 'OpenAI'}): the environment variable "
            f"{self.api_key_env} is not set; export the API key there (or set api_key_env "
            "to the variable that holds it)")

    def client(self) -> Any:
        import openai

        return openai.AsyncOpenAI(base_url=self.url(), api_key=self.api_key(), max_retries=0,
                                  timeout=self.timeout_seconds)

    def sync_client(self) -> Any:
        """A client for provider batches (a few calls, with the SDK's own retries)."""
        import openai

        return openai.OpenAI(base_url=self.url(), api_key=self.api_key(), max_retries=5,
                             timeout=self.timeout_seconds)

    def shared_limit(self, model: str) -> SharedLimit | None:
        if not self.requests_per_minute and not self.tokens_per_minute:
            return None
        return SharedLimit(self.requests_per_minute, self.tokens_per_minute,
                           self.rate_limit_url or default_url(),
                           f"{self.url() or 'openai'}|{model}")


_EMBEDDED: list[Any] = []


def _embedded_server() -> str:
    """The URL of this process's test server, started on first use."""
    if not _EMBEDDED:
        from longrun_dagster.llm_server import LlmServer

        _EMBEDDED.append(LlmServer().__enter__())
    url: str = _EMBEDDED[0].base_url
    return url


def _loopback(url: str | None) -> bool:
    host = urlparse(url or "").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ApiWork:
    """What an API stage maps over a partition: ``open_partition`` starts the window,
    ``__call__`` takes one batch's answers. Plain Python besides the resources it reads."""

    def __init__(self, request: RequestFn, parse: ParseFn | None, *, model: str, kind: str,
                 params: Mapping[str, Any], response_model: type[pydantic.BaseModel] | None,
                 batch_size: int, max_in_flight: int, policy: RetryPolicy,
                 prices: Prices | None, max_cost_usd: float | None, endpoint_key: str,
                 name: str, schema: Any, mode: str = "stream",
                 batch_poll_seconds: float = 30.0,
                 batch_completion_window: str = "24h") -> None:
        self.request, self.parse = request, parse or default_parse
        self.model, self.kind, self.params = model, kind, dict(params)
        self.response_model, self.batch_size = response_model, batch_size
        self.max_in_flight, self.policy, self.prices = max_in_flight, policy, prices
        self.max_cost_usd, self.endpoint_key, self.name = max_cost_usd, endpoint_key, name
        self.schema, self.mode = schema, mode
        self.batch_poll_seconds = batch_poll_seconds
        self.batch_completion_window = batch_completion_window

    def body(self, row: dict[str, Any], stage: StageContext) -> dict[str, Any]:
        """Row ``row``'s request body, with the model and the stage's sampling params."""
        made = self.request(row, stage)
        if isinstance(made, str):
            made = ({"messages": [{"role": "user", "content": made}]} if self.kind == CHAT
                    else {"input": made})
        if not isinstance(made, Mapping):
            raise ConfigError(f"api_stage {self.name!r}: request returned "
                              f"{type(made).__qualname__}; return the request body as a dict "
                              "(e.g. {'messages': [...]}) or the prompt as a str")
        body = {**self.params, **made}
        body.setdefault("model", self.model)
        if self.response_model is not None and self.kind == CHAT:
            body.setdefault("response_format", _response_format(self.response_model))
        return body

    def key(self, body: Mapping[str, Any]) -> str:
        """The request key: a hash of the kind of request and its body (the model in it)."""
        text = json.dumps({"kind": self.kind, "body": body}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    @contextlib.contextmanager
    def open_partition(self, frame: pd.DataFrame, stage: StageContext, attempt: Any
                       ) -> Generator["_Partition", None, None]:
        partition = _Partition(self, frame, stage, attempt)
        try:
            yield partition
        finally:
            partition.close()

    def __call__(self, batch: pd.DataFrame, stage: StageContext) -> Answered:
        raise ConfigError(f"api_stage {self.name!r}: its batches are computed inside a "
                          "partition (open_partition); call it through Dagster")


class _Partition:
    """One partition's window, opened at its first batch (after any resume)."""

    def __init__(self, work: ApiWork, frame: pd.DataFrame, stage: StageContext,
                 attempt: Any) -> None:
        self.work, self.frame, self.stage, self.attempt = work, frame, stage, attempt
        self.window: Answers | None = None
        self.journal: Journal | None = None
        self._clients: list[Any] = []  # synchronous clients to close with the partition
        self.rows: list[dict[str, Any]] = []
        self.keys: list[str] = []
        self.first_of: dict[str, int] = {}
        """Each request key's first row: rows with the same request share its answer, and
        its requests, tokens and cost are counted once, at that row."""

    def __call__(self, batch: pd.DataFrame, stage: StageContext) -> Answered:
        first = stage.batch_index * self.work.batch_size
        window = self.window or self._open(first)
        outputs: list[dict[str, Any]] = []
        rejected: list[int] = []
        reasons: list[dict[str, str]] = []
        for position in range(first, first + len(batch)):
            record = window.take(position)
            if self.first_of[self.keys[position]] == position:
                self._count(record)
            made = self._output(record, self.rows[position], stage)
            if isinstance(made, BadAnswer):
                rejected.append(position - first)
                reasons.append({"column": "answer", "check": made.reason,
                                "value": made.detail})
                stage.count(f"quarantined/{made.reason}")
            else:
                outputs.extend(made)
        output = pd.DataFrame(outputs) if outputs else empty_frame(self.work.schema)
        return Answered(output, batch.iloc[rejected], reasons, rejected)

    def _output(self, record: Record, row: dict[str, Any], stage: StageContext
                ) -> list[dict[str, Any]] | BadAnswer:
        if not record.ok or record.body is None:
            status = f"status {record.status}: " if record.status else ""
            return BadAnswer(record.reason, f"{status}{record.error} "
                                            f"({record.tries} tries)")
        answer = Answer(self.work.kind, record.body, self.work.response_model)
        problem = answer.problem()
        if problem is not None:
            return BadAnswer(problem.reason, f"{problem.detail}; raw: {answer.raw[:1000]}")
        try:
            made = self.work.parse(answer, row, stage)
        except BadAnswer as bad:
            return BadAnswer(bad.reason, f"{bad.detail}; raw: {answer.raw[:1000]}")
        except (ValueError, KeyError, pydantic.ValidationError) as exc:
            return BadAnswer(PARSE_ERROR, f"{type(exc).__name__}: {exc}; raw: "
                                          f"{answer.raw[:1000]}")
        return _rows(made, self.work.name)

    def _count(self, record: Record) -> None:
        stage = self.stage
        stage.count("requests", record.tries)
        stage.count("retries", max(0, record.tries - 1))
        if record.ok and record.body is not None:
            usage = Answer(self.work.kind, record.body).usage
            stage.count("prompt_tokens", usage["prompt_tokens"])
            stage.count("completion_tokens", usage["completion_tokens"])
            if self.work.prices is not None:
                stage.count("cost_usd", self.work.prices.cost(usage))

    def _open(self, first: int) -> Answers:
        work, stage = self.work, self.stage
        self.rows = [{str(k): v for k, v in row.items()}
                     for row in self.frame.to_dict("records")]
        requests = []
        for position, row in enumerate(self.rows):
            body = work.body(row, stage)
            requests.append(Request(work.key(body), body, estimate_tokens(body)))
            self.first_of.setdefault(requests[-1].key, position)
        self.keys = [r.key for r in requests]
        endpoint = getattr(stage.resources, work.endpoint_key)
        if not isinstance(endpoint, ApiEndpoint):
            raise ConfigError(f"api_stage {work.name!r} needs an ApiEndpoint under resource "
                              f"key {work.endpoint_key!r}, got {type(endpoint).__qualname__}")
        self.journal = Journal(self.attempt.store, self.attempt.layout.prefix, log=stage.log)
        restored = self.journal.restore()
        spent = 0.0
        if work.prices is not None:
            spent = sum(work.prices.cost(Answer(work.kind, restored[r.key].body or {}).usage)
                        for r in {r.key: r for r in requests}.values() if r.key in restored)
        where = f"api_stage {work.name}[{stage.partition_key}]"
        if work.mode == "batch":
            batches = ProviderBatch(
                self._closing(endpoint.sync_client()), requests[first:], first=first,
                restored=restored,
                journal=self.journal, store=self.attempt.store,
                prefix=self.attempt.layout.prefix, kind=work.kind,
                poll_seconds=work.batch_poll_seconds,
                completion_window=work.batch_completion_window,
                keepalive=stage.still_working, log=stage.log, where=where,
                max_retries=work.policy.max_retries)
            self.window = batches
            batches.start()
            return batches
        limit = endpoint.shared_limit(work.model)
        client = endpoint.client()
        call = _caller(client, work.kind)
        window = self.window = Window(
            call, requests[first:], first=first, restored=restored, journal=self.journal,
            max_in_flight=work.max_in_flight, policy=work.policy,
            limit=limit, prices=work.prices,
            max_cost_usd=work.max_cost_usd, spent_usd=spent,
            lookahead=2 * work.batch_size + 4 * work.max_in_flight,
            where=where, aclose=client.close)
        self.journal.start()
        window.start()
        stage.log.info(f"api_stage {work.name}[{stage.partition_key}]: {len(requests) - first} "
                       f"rows to go from row {first}; {len(restored)} answers kept from "
                       f"earlier attempts are reused")
        return window

    def _closing(self, client: Any) -> Any:
        self._clients.append(client)
        return client

    def close(self) -> None:
        if self.window is not None:
            self.window.close()
            stats = self.window.stats
            batches = (f", {stats.batches_submitted} provider batch(es) submitted"
                       if self.work.mode == "batch" else "")
            self.stage.log.info(
                f"api_stage {self.work.name}[{self.stage.partition_key}]: {stats.sent} "
                f"requests sent, {stats.answered} answered, {stats.reused} answers reused, "
                f"failures {stats.failures or 'none'}{batches}")
        for client in self._clients:
            client.close()
        if self.journal is not None:
            self.journal.close()


def _caller(client: Any, kind: str) -> Callable[[dict[str, Any]], Any]:
    """``call(body)``: the response's JSON. Body keys the SDK's ``create`` does not take
    (vLLM's ``top_k``, ``repetition_penalty``, ``guided_json``...) go in ``extra_body``,
    as the SDK wants them."""
    create = (client.chat.completions.with_raw_response.create if kind == CHAT
              else client.embeddings.with_raw_response.create)
    known = set(inspect.signature(create).parameters)

    async def call(body: dict[str, Any]) -> dict[str, Any]:
        extra = {k: v for k, v in body.items() if k not in known}
        given = {k: v for k, v in body.items() if k in known}
        if extra:
            given["extra_body"] = {**(given.get("extra_body") or {}), **extra}
        raw = await create(**given)
        try:
            answer = json.loads(raw.content)
        except ValueError as exc:
            raise InvalidResponse(f"the answer is not JSON ({exc}): "
                                  f"{raw.content[:200]!r}") from None
        if not isinstance(answer, dict):
            raise InvalidResponse(f"the answer is not a JSON object: {raw.content[:200]!r}")
        return answer

    return call


def _rows(made: Any, name: str) -> list[dict[str, Any]]:
    if isinstance(made, Mapping):
        return [dict(made)]
    if isinstance(made, pd.DataFrame):
        return [{str(k): v for k, v in row.items()} for row in made.to_dict("records")]
    if isinstance(made, pydantic.BaseModel):
        return [made.model_dump()]
    if isinstance(made, list | tuple) and all(isinstance(r, Mapping) for r in made):
        return [dict(r) for r in made]
    raise ConfigError(f"api_stage {name!r}: parse returned {type(made).__qualname__}; return "
                      "the output row as a dict (or a list of dicts, or a DataFrame)")


def _response_format(model: type[pydantic.BaseModel]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {
        "name": model.__name__, "schema": model.model_json_schema(), "strict": False}}


def api_stage(
    *,
    upstream: Any,
    schema: Any,
    model: str,
    parse: ParseFn | None = None,
    response_model: type[pydantic.BaseModel] | None = None,
    partitions_def: dg.PartitionsDefinition | None = None,
    partition_mapping: dg.PartitionMapping | None = None,
    name: str | None = None,
    retry_policy: dg.RetryPolicy | None = None,
    backfill_policy: dg.BackfillPolicy | None = None,
    automation_condition: dg.AutomationCondition[Any] | None = None,
    **options: Any,
) -> Callable[[RequestFn], dg.AssetsDefinition]:
    """Decorate ``request(row, stage) -> body`` to make a stage that calls a model behind an
    OpenAI-compatible endpoint, with a model stage's guarantees.

    ``request`` builds one row's request body (a dict of ``chat.completions.create`` or
    ``embeddings.create`` arguments, or just the prompt as a str); ``model`` and ``params``
    are added to it. ``parse(answer, row, stage)`` turns an ``Answer`` into the output
    row(s) (a dict, a list of dicts, a DataFrame, a pydantic model); without it the output
    is the ``response_model``'s fields (chat), ``{"text": ...}`` or ``{"embedding": ...}``.
    Up to ``max_in_flight`` requests stay open over the whole partition; answers are kept
    as they arrive (a relaunch sends only the requests never answered) and reach ``parse``
    in input order. A truncated (``finish_reason == "length"``), empty, unparseable or
    ill-fitting answer, a request given up after its retries, and a ``BadAnswer`` (or
    ``ValueError``, ``KeyError``, pydantic ``ValidationError``) raised by ``parse`` each
    quarantine the row with its reason and raw text, counted against
    ``max_bad_fraction``. Tokens, requests, retries, cost and quarantined rows by reason
    are ``counts/...`` metadata per partition.

    ``options``: the ``ApiOptions`` (``kind``, ``params``, ``max_in_flight``, retries,
    prices, ``endpoint_key``...) and every ``model_stage`` option (``StageOptions``).
    """
    where = f"api_stage {name!r}" if name else "api_stage"
    api_fields = {k: options.pop(k) for k in list(options) if k in ApiOptions.model_fields}
    unknown = set(options) - set(StageOptions.model_fields)
    if unknown:
        every = [*ApiOptions.model_fields, *StageOptions.model_fields]
        raise ConfigError(f"{where}: {sorted(unknown)[0]!r} is not an option of an API "
                          f"stage; the options are {', '.join(every)}")

    def problem(option: str, value: Any, fix: str) -> ConfigError:
        return ConfigError(f"{where}: {option} = {value!r} is wrong: {fix}")

    if not isinstance(model, str) or not model.strip():
        raise problem("model", model, "the name of the model the endpoint serves, e.g. "
                      "meta-llama/Llama-3.1-70B-Instruct")
    api = ApiOptions.checked(api_fields, problem)
    if api.kind == EMBEDDINGS and response_model is not None:
        raise problem("response_model", response_model, "a chat stage's; embeddings have no "
                      "JSON answer")
    checked_schema = as_schema(schema)
    if options.get("one_row_per_input") is None:
        options["one_row_per_input"] = True
    prices = (Prices(**api.price_per_million_tokens) if api.price_per_million_tokens
              else None)

    def decorate(request: RequestFn) -> dg.AssetsDefinition:
        asset_name = name or request.__name__
        identity = {"model": model, "kind": api.kind, "params": api.params,
                    "response_model": response_model.model_json_schema()
                    if response_model is not None else None}
        code = options.get("code_version") or fingerprint.code_identity(request, parse)[:16]
        work = ApiWork(
            request, parse, model=model, kind=api.kind, params=api.params,
            response_model=response_model, batch_size=options.get("batch_size") or 256,
            max_in_flight=api.max_in_flight,
            policy=RetryPolicy(api.max_retries, api.retry_base_seconds,
                               outage_seconds=api.outage_seconds),
            prices=prices, max_cost_usd=api.max_cost_usd, endpoint_key=api.endpoint_key,
            name=asset_name, schema=checked_schema, mode=api.mode,
            batch_poll_seconds=api.batch_poll_seconds,
            batch_completion_window=api.batch_completion_window)
        given = {k: options.get(k) for k in StageOptions.model_fields}
        given.update(
            upstream=upstream, schema=checked_schema, partitions_def=partitions_def,
            partition_mapping=partition_mapping, setup=None, name=asset_name,
            retry_policy=retry_policy, backfill_policy=backfill_policy,
            automation_condition=automation_condition,
            code_version=f"{code}-{fingerprint.digest(identity, what='api')[:8]}",
            description=options.get("description") or (request.__doc__ or "").strip() or None,
            kinds=options.get("kinds") or ["openai"])
        return declare(given, where=where,
                       extra_resource_keys=[api.endpoint_key])(work)  # type: ignore[arg-type]

    return decorate
