"""What ``parse`` receives: one answer of an endpoint, and the checks that make a malformed
answer a quarantined row (with its raw text and reason) instead of an exception."""

import functools
import json
from dataclasses import dataclass
from typing import Any

import pydantic

CHAT, EMBEDDINGS = "chat", "embeddings"
KINDS = (CHAT, EMBEDDINGS)

TRUNCATED, EMPTY, MALFORMED_JSON, SCHEMA_MISMATCH, PARSE_ERROR = (
    "truncated", "empty", "malformed_json", "schema_mismatch", "parse_error")


class BadAnswer(ValueError):  # noqa: N818 - a reason, raised by parse, read by the stage
    """Raise from ``parse`` to quarantine the row with ``reason`` (the answer's raw text is
    kept beside it). ``ValueError``, ``KeyError`` and pydantic's ``ValidationError`` from
    ``parse`` are quarantined too, as ``parse_error``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Answer:
    """An endpoint's answer to one row's request."""

    kind: str
    body: dict[str, Any]
    """The response as JSON, as the server sent it."""
    response_model: type[pydantic.BaseModel] | None = None

    @property
    def text(self) -> str:
        """The first choice's message content (chat)."""
        choices = self.body.get("choices") or [{}]
        content = (choices[0].get("message") or {}).get("content")
        return content if isinstance(content, str) else ""

    @property
    def finish_reason(self) -> str | None:
        choices = self.body.get("choices") or [{}]
        reason = choices[0].get("finish_reason")
        return None if reason is None else str(reason)

    @property
    def embedding(self) -> list[float]:
        """The first input's embedding (embeddings)."""
        data = self.body.get("data") or [{}]
        return list(data[0].get("embedding") or [])

    @property
    def usage(self) -> dict[str, int]:
        usage = self.body.get("usage") or {}
        return {k: int(usage.get(k) or 0) for k in ("prompt_tokens", "completion_tokens")}

    @functools.cached_property
    def json(self) -> Any:
        """The content parsed as JSON (``BadAnswer`` ``malformed_json`` if it is not)."""
        try:
            return json.loads(self.text)
        except ValueError as exc:
            raise BadAnswer(MALFORMED_JSON, str(exc)) from None

    @functools.cached_property
    def parsed(self) -> Any:
        """The content as the stage's ``response_model`` (``BadAnswer`` if it does not
        fit)."""
        if self.response_model is None:
            return self.json
        try:
            return self.response_model.model_validate(self.json)
        except pydantic.ValidationError as exc:
            raise BadAnswer(SCHEMA_MISMATCH, _short(str(exc))) from None

    @functools.cached_property
    def response(self) -> Any:
        """The answer as the ``openai`` SDK's type (``ChatCompletion``,
        ``CreateEmbeddingResponse``)."""
        from openai.types import CreateEmbeddingResponse
        from openai.types.chat import ChatCompletion

        model = ChatCompletion if self.kind == CHAT else CreateEmbeddingResponse
        return model.model_validate(self.body)

    @property
    def raw(self) -> str:
        """What a quarantined row keeps of the answer."""
        return self.text if self.kind == CHAT else json.dumps(self.body)[:2000]

    def problem(self) -> BadAnswer | None:
        """Why this answer is not an answer, before ``parse`` sees it."""
        if self.kind == EMBEDDINGS:
            return None if self.embedding else BadAnswer(EMPTY, "no embedding")
        if self.finish_reason == "length":
            return BadAnswer(TRUNCATED, "finish_reason is 'length' (raise max_tokens)")
        if not self.text.strip():
            return BadAnswer(EMPTY, "the answer has no content")
        if self.response_model is not None:
            try:
                self.parsed  # noqa: B018 - cached; raises BadAnswer for a bad answer
            except BadAnswer as bad:
                return bad
        return None


def default_parse(answer: Answer, row: dict[str, Any], stage: Any) -> dict[str, Any]:
    """The output row without a ``parse``: the response model's fields, the answer's JSON
    object, or ``{"text": ...}`` (chat); ``{"embedding": [...]}`` (embeddings)."""
    if answer.kind == EMBEDDINGS:
        return {"embedding": answer.embedding}
    if answer.response_model is not None:
        parsed: pydantic.BaseModel = answer.parsed
        return parsed.model_dump()
    return {"text": answer.text}


def _short(text: str, limit: int = 500) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."
