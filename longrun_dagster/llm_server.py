"""A small OpenAI-compatible server with a deterministic tiny "model" and injected faults:
what tests, benchmarks and the example pipeline call instead of a paid endpoint.

Routes: ``/v1/chat/completions``, ``/v1/embeddings``, ``/v1/files`` (upload, content),
``/v1/batches`` (create, retrieve, list); ``/_log``, ``/_faults`` and ``/_reset`` for
tests. Faults are drawn from a hash of (seed, request body, how many times that body was
seen), so a chaos run injects the same faults whatever the timing. The model answers a
chat with a JSON object about the last user message (``summary``, ``n_words``,
``label``), and an embedding with a vector derived from the text's hash.

Run it alone: ``python -m longrun_dagster.llm_server --port 8011`` (``./scripts/run``
starts one for the example pipeline).
"""

import argparse
import asyncio
import hashlib
import json
import logging
import random
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from aiohttp import web

MODEL = "longrun-tiny"


@dataclass
class Faults:
    """What the server does besides answering; fractions are per request."""

    latency_seconds: float = 0.0
    latency_jitter: float = 0.0
    """Latency is ``latency_seconds * (1 + jitter * u)``, u uniform in -1..1."""
    rate_limited: float = 0.0
    retry_after_seconds: float = 0.2
    server_error: float = 0.0
    timeout: float = 0.0
    """Fraction of requests that hang for ``hang_seconds`` (a client timeout)."""
    hang_seconds: float = 30.0
    dropped: float = 0.0
    """Fraction whose connection is closed without an answer."""
    malformed: float = 0.0
    truncated: float = 0.0
    empty: float = 0.0
    bad_request: float = 0.0
    down: bool = False
    """Every request fails with 503 (an outage)."""
    poisoned: tuple[str, ...] = ()
    """Texts (last user message, or input) whose every request fails with 500."""
    scripted: dict[str, list[str | None]] = field(default_factory=dict)
    """Per text, the fault of its 1st, 2nd... request (a fault's name, or None for an
    answer); requests past the list are answered. Overrides the fractions."""
    batch_seconds: float = 0.5
    """How long a provider batch takes to complete."""
    batch_expires: int = 0
    """The next this many batches expire with about half their requests answered."""
    seed: int = 0


@dataclass
class _State:
    faults: Faults = field(default_factory=Faults)
    log: list[dict[str, Any]] = field(default_factory=list)
    seen: dict[str, int] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    batches: dict[str, dict[str, Any]] = field(default_factory=dict)


def _draw(state: _State, body: bytes) -> tuple[float, int]:
    """A number in 0..1 for this request (the n-th time its body was seen), and n."""
    digest = hashlib.sha256(body).hexdigest()
    n = state.seen.get(digest, 0)
    state.seen[digest] = n + 1
    h = hashlib.sha256(f"{state.faults.seed}:{digest}:{n}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64, n


def _fault(faults: Faults, u: float) -> str | None:
    """The fault a request of draw ``u`` gets: the kinds take consecutive slices of 0..1."""
    edge = 0.0
    for kind in ("rate_limited", "server_error", "timeout", "dropped", "malformed",
                 "truncated", "empty", "bad_request"):
        edge += getattr(faults, kind)
        if u < edge:
            return kind
    return None


def answer_of(text: str) -> dict[str, Any]:
    """The tiny model's answer to ``text``."""
    words = text.split()
    return {"summary": " ".join(words[:5]), "n_words": len(words),
            "label": "long" if len(words) > 12 else "short"}


def embedding_of(text: str, dimensions: int = 8) -> list[float]:
    h = hashlib.sha256(text.encode()).digest()
    return [round((h[i % len(h)] - 127.5) / 127.5, 6) for i in range(dimensions)]


def _last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if message.get("role") == "user":
            content = message.get("content")
            return content if isinstance(content, str) else json.dumps(content)
    return ""


def chat_answer(body: dict[str, Any], fault: str | None = None) -> dict[str, Any]:
    """The body of a chat completion for ``body`` (with a content fault, if any)."""
    text = _last_user_text(body)
    content = json.dumps(answer_of(text), sort_keys=True)
    finish = "stop"
    if fault == "malformed":
        content = content[: len(content) // 2]
    elif fault == "truncated":
        content, finish = content[: len(content) // 3], "length"
    elif fault == "empty":
        content = ""
    prompt = sum(len(str(m.get("content", "")).split()) for m in body.get("messages") or [])
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion",
        "created": int(time.time()), "model": body.get("model", MODEL),
        "choices": [{"index": 0, "finish_reason": finish, "logprobs": None,
                     "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": prompt + 3, "completion_tokens": len(content.split()) + 1,
                  "total_tokens": prompt + 3 + len(content.split()) + 1},
    }


def embeddings_answer(body: dict[str, Any]) -> dict[str, Any]:
    inputs = body.get("input")
    texts = [inputs] if isinstance(inputs, str) else list(inputs or [])
    dimensions = int(body.get("dimensions") or 8)
    tokens = sum(len(str(t).split()) for t in texts)
    return {"object": "list", "model": body.get("model", MODEL),
            "data": [{"object": "embedding", "index": i,
                      "embedding": embedding_of(str(t), dimensions)}
                     for i, t in enumerate(texts)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


class LlmServer:
    """The server on ``127.0.0.1``, in a thread of its own (``with LlmServer() as s:``), or
    in the foreground (``serve_forever``)."""

    def __init__(self, port: int = 0, faults: Faults | None = None) -> None:
        self.port = port
        self.state = _State(faults=faults or Faults())
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # -- for tests ---------------------------------------------------------------------

    def set_faults(self, **changes: Any) -> None:
        with self._lock:
            for name, value in changes.items():
                if not hasattr(self.state.faults, name):
                    raise TypeError(f"no fault named {name!r}")
                setattr(self.state.faults, name, value)

    def requests(self, path: str = "/v1/chat/completions") -> list[dict[str, Any]]:
        """The requests to ``path`` so far (not those of provider batches): ``key`` (the
        body's digest), ``status``, ``fault``, ``text`` (the last user message or the
        input), ``started``/``ended``."""
        with self._lock:
            return [dict(r) for r in self.state.log if r["path"] == path and
                    not r.get("batch")]

    def batch_requests(self) -> list[dict[str, Any]]:
        """The requests provider batches held (``key``: the request's custom_id)."""
        with self._lock:
            return [dict(r) for r in self.state.log if r.get("batch")]

    def reset(self) -> None:
        with self._lock:
            self.state.log.clear()
            self.state.seen.clear()

    # -- running -----------------------------------------------------------------------

    def __enter__(self) -> "LlmServer":
        started = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self._start())
            started.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="llm-server", daemon=True)
        self._thread.start()
        started.wait(30)
        return self

    def __exit__(self, *exc: object) -> None:
        loop = self._loop
        if loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        loop.close()

    async def _start(self) -> None:
        logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)  # dropped on purpose
        app = web.Application(client_max_size=256 * 2**20)
        app.add_routes([
            web.post("/v1/chat/completions", self._chat),
            web.post("/v1/embeddings", self._embeddings),
            web.post("/v1/files", self._upload),
            web.get("/v1/files/{id}/content", self._file_content),
            web.get("/v1/files/{id}", self._file),
            web.post("/v1/batches", self._create_batch),
            web.get("/v1/batches/{id}", self._batch),
            web.get("/v1/batches", self._list_batches),
            web.get("/_log", self._log),
            web.post("/_faults", self._set_faults),
            web.post("/_reset", self._reset),
        ])
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, backlog=1024)
        await site.start()
        server = site._server  # noqa: SLF001 - aiohttp keeps the bound socket there
        if server is not None and self.port == 0:
            sockets = getattr(server, "sockets", None) or []
            self.port = sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def serve_forever(self) -> None:
        async def main() -> None:
            await self._start()
            print(f"longrun llm server on {self.base_url}", flush=True)
            await asyncio.Event().wait()

        asyncio.run(main())

    # -- routes ------------------------------------------------------------------------

    async def _inference(self, request: web.Request, answer: Any) -> web.StreamResponse:
        raw = await request.read()
        with self._lock:
            faults = Faults(**{**asdict(self.state.faults),
                               "scripted": self.state.faults.scripted})
            u, nth = _draw(self.state, raw)
        try:
            body = json.loads(raw)
        except ValueError:
            return _error(400, "the body is not JSON")
        text = (_last_user_text(body) if "messages" in body else str(body.get("input")))
        entry = {"path": request.path, "key": hashlib.sha256(raw).hexdigest()[:16],
                 "text": text, "nth": nth, "started": time.time(), "status": 0}
        with self._lock:
            self.state.log.append(entry)
        script = faults.scripted.get(text)
        fault = ("down" if faults.down else "server_error" if text in faults.poisoned
                 else (script[nth] if nth < len(script) else None) if script is not None
                 else _fault(faults, u))
        entry["fault"] = fault
        if faults.latency_seconds:
            rng = random.Random(u)
            await asyncio.sleep(faults.latency_seconds *
                                (1 + faults.latency_jitter * (2 * rng.random() - 1)))
        status, response = 200, None
        if fault == "down":
            status, response = 503, _error(503, "the server is down")
        elif fault == "rate_limited":
            status = 429
            response = _error(429, "rate limited", headers={
                "Retry-After": f"{faults.retry_after_seconds:g}"})
        elif fault == "server_error":
            status, response = 500, _error(500, "internal error")
        elif fault == "bad_request":
            status, response = 400, _error(400, "the request is invalid")
        elif fault == "timeout":
            await asyncio.sleep(faults.hang_seconds)
        elif fault == "dropped":
            entry.update(status=-1, ended=time.time())
            if request.transport is not None:
                request.transport.close()
            raise ConnectionResetError("dropped by the test server")
        if response is None:
            response = web.json_response(answer(body, fault))
        entry.update(status=status, ended=time.time())
        return response

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._inference(request, chat_answer)

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._inference(request, lambda body, _fault: embeddings_answer(body))

    async def _upload(self, request: web.Request) -> web.Response:
        form = await request.post()
        upload = form.get("file")
        file = getattr(upload, "file", None)
        data = file.read() if file is not None else str(upload).encode()
        file_id = f"file-{uuid.uuid4().hex[:16]}"
        with self._lock:
            self.state.files[file_id] = data
            self.state.log.append({"path": "/v1/files", "key": file_id, "text": "",
                                   "nth": 0, "started": time.time(), "status": 200})
        return web.json_response(_file_object(file_id, data, str(form.get("purpose", ""))))

    async def _file(self, request: web.Request) -> web.Response:
        file_id = request.match_info["id"]
        data = self.state.files.get(file_id)
        if data is None:
            return _error(404, f"no file {file_id}")
        return web.json_response(_file_object(file_id, data, "batch"))

    async def _file_content(self, request: web.Request) -> web.Response:
        data = self.state.files.get(request.match_info["id"])
        if data is None:
            return _error(404, "no such file")
        return web.Response(body=data, content_type="application/octet-stream")

    async def _create_batch(self, request: web.Request) -> web.Response:
        body = await request.json()
        batch_id = f"batch_{uuid.uuid4().hex[:16]}"
        with self._lock:
            if body.get("input_file_id") not in self.state.files:
                return _error(400, "no such input file")
            now = int(time.time())
            self.state.batches[batch_id] = {
                "id": batch_id, "object": "batch", "endpoint": body["endpoint"],
                "input_file_id": body["input_file_id"],
                "completion_window": body.get("completion_window", "24h"),
                "status": "in_progress", "created_at": now, "in_progress_at": now,
                "metadata": body.get("metadata"), "output_file_id": None,
                "error_file_id": None, "request_counts": {"total": 0, "completed": 0,
                                                          "failed": 0},
                "_ready": time.monotonic() + self.state.faults.batch_seconds,
            }
            self.state.log.append({"path": "/v1/batches", "key": batch_id, "text": "",
                                   "nth": 0, "started": time.time(), "status": 200})
        return web.json_response(_public(self.state.batches[batch_id]))

    async def _batch(self, request: web.Request) -> web.Response:
        batch_id = request.match_info["id"]
        with self._lock:
            batch = self.state.batches.get(batch_id)
            if batch is None:
                return _error(404, f"no batch {batch_id}")
            if batch["status"] == "in_progress" and time.monotonic() >= batch["_ready"]:
                self._finish_batch(batch)
            return web.json_response(_public(batch))

    async def _list_batches(self, request: web.Request) -> web.Response:
        with self._lock:
            data = [_public(b) for b in reversed(list(self.state.batches.values()))]
        return web.json_response({"object": "list", "data": data, "has_more": False,
                                  "first_id": data[0]["id"] if data else None,
                                  "last_id": data[-1]["id"] if data else None})

    def _finish_batch(self, batch: dict[str, Any]) -> None:
        lines = self.state.files[batch["input_file_id"]].decode().splitlines()
        expires = self.state.faults.batch_expires > 0
        if expires:
            self.state.faults.batch_expires -= 1
        out, errors = [], []
        for i, line in enumerate(line for line in lines if line.strip()):
            item = json.loads(line)
            if expires and i % 2:  # as OpenAI does: in the error file, with no response
                errors.append({"id": f"req_{i}", "custom_id": item["custom_id"],
                               "response": None, "error": {
                                   "code": "batch_expired", "message": "This request could "
                                   "not be executed before the completion window expired."}})
                continue
            raw = json.dumps(item["body"], sort_keys=True).encode()
            u, _ = _draw(self.state, raw)
            self.state.log.append({"path": item["url"], "key": item["custom_id"],
                                   "text": _last_user_text(item["body"]), "nth": 0,
                                   "started": time.time(), "status": 200, "batch": True})
            if _fault(self.state.faults, u) == "bad_request":
                errors.append({"id": f"req_{i}", "custom_id": item["custom_id"],
                               "response": {"status_code": 400, "body": {
                                   "error": {"message": "the request is invalid"}}},
                               "error": None})
                continue
            answer = (chat_answer(item["body"], _fault(self.state.faults, u))
                      if item["url"].endswith("/chat/completions")
                      else embeddings_answer(item["body"]))
            out.append({"id": f"req_{i}", "custom_id": item["custom_id"],
                        "response": {"status_code": 200, "request_id": f"r{i}",
                                     "body": answer}, "error": None})
        batch["status"] = "expired" if expires else "completed"
        for kind, rows in (("output_file_id", out), ("error_file_id", errors)):
            if rows:
                file_id = f"file-{uuid.uuid4().hex[:16]}"
                self.state.files[file_id] = "".join(json.dumps(r) + "\n" for r in rows).encode()
                batch[kind] = file_id
        batch["request_counts"] = {"total": len(lines), "completed": len(out),
                                   "failed": len(errors)}
        batch["completed_at" if not expires else "expired_at"] = int(time.time())

    async def _log(self, request: web.Request) -> web.Response:
        with self._lock:
            return web.json_response(list(self.state.log))

    async def _set_faults(self, request: web.Request) -> web.Response:
        self.set_faults(**(await request.json()))
        return web.json_response(asdict(self.state.faults))

    async def _reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({})


def _public(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if not k.startswith("_")}


def _file_object(file_id: str, data: bytes, purpose: str) -> dict[str, Any]:
    return {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
            "filename": f"{file_id}.jsonl", "purpose": purpose or "batch",
            "status": "processed"}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "test_server",
                                        "code": status}}, status=status, headers=headers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--latency", type=float, default=0.0,
                        help="seconds per request (mean)")
    parser.add_argument("--jitter", type=float, default=0.0,
                        help="latency spread, 0..1 of the mean")
    args = parser.parse_args()
    LlmServer(args.port, Faults(latency_seconds=args.latency,
                                latency_jitter=args.jitter)).serve_forever()


if __name__ == "__main__":
    main()
