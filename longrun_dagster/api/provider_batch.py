"""Durable provider batches (``mode="batch"``): a partition's unanswered requests go to the
endpoint as one OpenAI batch (``/v1/files`` + ``/v1/batches``), and a relaunch reconnects
to the batch it submitted instead of paying for a second one.

The submission is recorded in the partition's folder before and after each step that
costs money, so a kill at any point leaves enough to find the batch again:

    <partition>/_provider_batches/<digest of the request keys>.json
        {"file_id": ..., "batch_id": ...}

written after the upload (``batch_id`` null) and after the batch is created. A relaunch
that finds a record without a batch id looks for a batch whose metadata carries the same
digest (a kill between the create call and the second write) before creating one. The
answers of a finished batch go into the answers journal before rows are taken from them;
rows the batch did not answer (it expired) are sent again in a new batch, alone. The wait
reports the batch's own progress to the heartbeat, so the stalled-run sensor does not end
a healthy wait.
"""

import hashlib
import json
import threading
from collections.abc import Callable, Sequence
from typing import Any

from longrun_dagster.api.answer import CHAT
from longrun_dagster.api.journal import Journal, Record
from longrun_dagster.api.policy import RETRIED_STATUSES
from longrun_dagster.api.window import Answers, Request
from longrun_dagster.errors import ApiOutage, ObjectNotFound
from longrun_dagster.storage import ObjectStore

BATCHES = "_provider_batches/"
TERMINAL = frozenset({"completed", "expired", "cancelled", "failed"})
WORKING = frozenset({"validating", "in_progress", "finalizing", "cancelling"})


class ProviderBatch(Answers):
    """The answers to ``requests`` (rows ``first``..) from provider batches."""

    def __init__(self, client: Any, requests: Sequence[Request], *, first: int,
                 restored: dict[str, Record], journal: Journal, store: ObjectStore,
                 prefix: str, kind: str, poll_seconds: float, completion_window: str,
                 keepalive: Callable[[], None], log: Any, where: str,
                 max_retries: int = 6) -> None:
        super().__init__(requests, first=first, restored=restored, journal=journal,
                         where=where)
        self.client, self.store, self.folder = client, store, prefix + BATCHES
        self.url = "/v1/chat/completions" if kind == CHAT else "/v1/embeddings"
        self.poll_seconds, self.completion_window = poll_seconds, completion_window
        self.keepalive, self.log = keepalive, log
        self.max_retries = max_retries
        self._tries: dict[str, int] = {}  # batches each request was in without an answer
        self._woken = threading.Event()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="longrun-provider-batch",
                                        daemon=True)
        self._thread.start()

    def _poke(self) -> None:
        if self._closing:
            self._woken.set()

    def _run(self) -> None:
        try:
            self._resolve_restored()
            while not self._closing:
                todo = {r.key: r for r in self.requests if r.key not in self._results}
                if not todo:
                    return
                settled = self._one_batch(list(todo.values()))
                if len(todo) > settled and not self._closing:
                    self.log.warning(f"{self.where}: a provider batch settled {settled} of "
                                     f"its {len(todo)} requests; submitting the others again")
        except Exception as exc:  # noqa: BLE001 - handed to the stage's loop, which raises
            self._stop(exc)
        finally:
            self._drain()

    def _one_batch(self, todo: list[Request]) -> int:
        """Submit (or reconnect to) the batch of ``todo``, wait for it, keep its answers;
        how many requests it answered or gave up."""
        digest = _digest(self.url, [r.key for r in todo])
        record = self._record(digest)
        batch = self._reconnect(record, digest) if record else None
        if batch is None or (batch.status in TERMINAL and record and record.get("harvested")):
            batch = self._submit(todo, digest)
        batch = self._wait(batch)
        if batch is None:
            return 0
        found = self._results_of(batch, {r.key for r in todo})
        for one in found.values():
            if one.ok:
                self.journal.add(one)
        self.journal.flush()  # kept before any row is taken from them
        self._write(digest, {**(record or {}), "batch_id": batch.id, "harvested": True})
        settled = 0
        for request in todo:
            one = found.get(request.key) or Record(
                request.key, False, None, 1, None, "batch_unanswered",
                f"provider batch {batch.id} ({batch.status}) has no answer for it")
            if one.ok or not _again(one):
                self._resolve(one)
                settled += 1
            else:  # expired, cancelled, timed out, 429/5xx, missing: in the next batch
                tries = self._tries[request.key] = self._tries.get(request.key, 0) + 1
                if tries > self.max_retries:
                    self._resolve(Record(request.key, False, None, tries, one.status,
                                         "retries_exhausted", one.error))
                    settled += 1
        if batch.status in ("failed", "cancelled"):
            raise ApiOutage(f"{self.where}: provider batch {batch.id} {batch.status}: "
                            f"{_errors(batch)}; its answers are kept; run the partition again "
                            "to submit the rest anew")
        return settled

    def _reconnect(self, record: dict[str, Any], digest: str) -> Any:
        batch_id = record.get("batch_id")
        if batch_id is None:  # killed between the create call and its record: look
            batch_id = self._find(digest)
            if batch_id is None:
                return None
            self._write(digest, {**record, "batch_id": batch_id})
        self.log.info(f"{self.where}: reconnecting to provider batch {batch_id}")
        return self.client.batches.retrieve(batch_id)

    def _find(self, digest: str) -> str | None:
        for batch in self.client.batches.list(limit=100):
            if (batch.metadata or {}).get("longrun_key") == digest:
                found: str = batch.id
                return found
        return None

    def _submit(self, todo: list[Request], digest: str) -> Any:
        lines = "".join(json.dumps({"custom_id": r.key, "method": "POST", "url": self.url,
                                    "body": r.body}, sort_keys=True) + "\n" for r in todo)
        upload = self.client.files.create(file=("longrun-batch.jsonl", lines.encode()),
                                          purpose="batch")
        self._write(digest, {"file_id": upload.id, "batch_id": None})
        batch = self.client.batches.create(
            input_file_id=upload.id, endpoint=self.url,
            completion_window=self.completion_window, metadata={"longrun_key": digest})
        self._write(digest, {"file_id": upload.id, "batch_id": batch.id})
        self.stats.batches_submitted += 1
        self.stats.sent += len(todo)
        self.log.info(f"{self.where}: submitted provider batch {batch.id} of {len(todo)} "
                      "requests")
        return batch

    def _wait(self, batch: Any) -> Any:
        done = -1
        while batch.status not in TERMINAL:
            counts = batch.request_counts
            completed = counts.completed if counts is not None else 0
            if batch.status in WORKING or completed > done:
                self.keepalive()  # the provider says it works on it: progress
            done = completed
            if self._woken.wait(self.poll_seconds):
                return None
            batch = self.client.batches.retrieve(batch.id)
        return batch

    def _results_of(self, batch: Any, wanted: set[str]) -> dict[str, Record]:
        records: dict[str, Record] = {}
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            for line in self.client.files.content(file_id).text.splitlines():
                if line.strip():
                    one = _record_of(json.loads(line))
                    if one.key in wanted and not (one.key in records and records[one.key].ok):
                        records[one.key] = one
        self.stats.answered += sum(r.ok for r in records.values())
        return records

    def _record(self, digest: str) -> dict[str, Any] | None:
        try:
            data, _ = self.store.get(f"{self.folder}{digest}.json")
        except ObjectNotFound:
            return None
        found: dict[str, Any] = json.loads(data)
        return found

    def _write(self, digest: str, record: dict[str, Any]) -> None:
        self.store.put(f"{self.folder}{digest}.json", json.dumps(record).encode())


AGAIN_CODES = frozenset({"batch_expired", "batch_cancelled", "request_timeout"})
"""Error codes of a batch's error file that mean "not answered", not "refused"."""


def _record_of(line: dict[str, Any]) -> Record:
    response = line.get("response") or {}
    status = response.get("status_code")
    body = response.get("body")
    if status == 200 and isinstance(body, dict):
        return Record(line["custom_id"], True, body, 1, 200)
    error = line.get("error") or (body or {}).get("error") or {}
    message = error.get("message", "") if isinstance(error, dict) else str(error)
    code = error.get("code") if isinstance(error, dict) else None
    reason = (f"http_{status}" if status else str(code) if code in AGAIN_CODES
              else "batch_error")
    return Record(line["custom_id"], False, None, 1, status, reason, str(message)[:500])


def _again(record: Record) -> bool:
    """Whether a request a batch did not answer goes in the next batch (it was not refused:
    expired, cancelled, timed out, rate-limited, a server error, or missing)."""
    if record.reason in AGAIN_CODES or record.reason == "batch_unanswered":
        return True
    return record.status is not None and (record.status in RETRIED_STATUSES or
                                          record.status >= 500)


def _digest(url: str, keys: list[str]) -> str:
    return hashlib.sha256(json.dumps([url, sorted(keys)]).encode()).hexdigest()[:24]


def _errors(batch: Any) -> str:
    errors = getattr(batch, "errors", None)
    data = getattr(errors, "data", None) or []
    return "; ".join(str(getattr(e, "message", e)) for e in data) or "no reason given"
