"""The response shapes of ``/v1/chat/completions``: ``chat.completion``,
``chat.completion.chunk``, usage, log-probabilities, ``system_fingerprint``.

Pure logic, shared by the API (live responses and stream chunks) and the workers (Batch API
results, log-probability entries). The request contract is ``tasks/contracts/chat.py``.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from configs.catalog import CatalogEntry
from tasks.store.usage import Usage

# OpenAI writes a log-probability of -inf as this (JSON has no infinity)
MIN_LOGPROB = -9999.0

FinishReason = Literal["stop", "length"]


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One token's log-probability. ``raw``: the token's bytes, when ``token`` cannot say
    them (a token that ends inside a UTF-8 character)."""

    token: str
    logprob: float
    raw: bytes | None = None

    def body(self) -> dict[str, Any]:
        raw = self.raw if self.raw is not None else self.token.encode("utf-8", "replace")
        value = self.logprob
        finite = value == value and value > MIN_LOGPROB  # NaN, -inf: OpenAI's floor
        return {
            "token": self.token,
            "logprob": value if finite else MIN_LOGPROB,
            "bytes": list(raw),
        }


def logprob_entry(chosen: TokenLogprob, top: Sequence[TokenLogprob] = ()) -> dict[str, Any]:
    """One item of a choice's ``logprobs.content``."""
    return {**chosen.body(), "top_logprobs": [t.body() for t in top]}


def _logprobs(content: Sequence[dict[str, Any]] | None) -> dict[str, Any] | None:
    return None if content is None else {"content": list(content), "refusal": None}


def choice_body(
    index: int,
    content: str,
    finish_reason: FinishReason,
    logprobs: Sequence[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One choice of a ``chat.completion`` (``logprobs``: :func:`logprob_entry` items)."""
    return {
        "index": index,
        "message": {"role": "assistant", "content": content, "refusal": None},
        "logprobs": _logprobs(logprobs),
        "finish_reason": finish_reason,
    }


def completion_body(
    *,
    id: str,
    created: int,
    model: str,
    choices: Sequence[dict[str, Any]],
    usage: Usage,
    fingerprint: str | None,
) -> dict[str, Any]:
    """A ``chat.completion`` (``choices``: :func:`choice_body` items)."""
    return {
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": list(choices),
        "usage": usage_body(usage.prompt_tokens, usage.completion_tokens),
        "system_fingerprint": fingerprint,
    }


def chunk_choice(
    index: int,
    *,
    role: Literal["assistant"] | None = None,
    content: str | None = None,
    finish_reason: FinishReason | None = None,
    logprobs: Sequence[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One choice of a ``chat.completion.chunk``: the role on a choice's first chunk, then
    text, then the finish reason."""
    delta: dict[str, Any] = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    return {
        "index": index,
        "delta": delta,
        "logprobs": _logprobs(logprobs),
        "finish_reason": finish_reason,
    }


def chunk_body(
    *,
    id: str,
    created: int,
    model: str,
    fingerprint: str | None,
    choices: Sequence[dict[str, Any]],
    usage: Usage | None = None,
) -> dict[str, Any]:
    """A ``chat.completion.chunk`` (``choices``: :func:`chunk_choice` items). With
    ``stream_options.include_usage`` the last chunk has no choices and the usage."""
    body: dict[str, Any] = {
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": list(choices),
    }
    if usage is not None:
        body["usage"] = usage_body(usage.prompt_tokens, usage.completion_tokens)
    return body


def fingerprint(entry: CatalogEntry) -> str:
    """``system_fingerprint``: changes when what serves the model (weights, backend,
    dtype) changes, as OpenAI's does."""
    what = f"{entry.id}|{entry.backend}|{sorted(entry.source.items())}|{entry.dtype}"
    return "fp_" + hashlib.sha256(what.encode()).hexdigest()[:10]
