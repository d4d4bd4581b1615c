"""/v1/chat/completions: parse and check, resolve images, enqueue on the live lane, and
shape the answer (one ``chat.completion``, or Server-Sent Events of chunks).

A streaming request's headers go out only once its first event is in: an error before
that (an unknown model, a prompt over the context, a full queue, a first-event timeout)
is answered with its own status, as OpenAI does; after it, a failure is an ``error``
event in the stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson

from api.live import LiveClient, LiveStream
from api.serving import load_json
from configs.catalog import Catalog
from configs.settings import Settings
from tasks.contracts.chat import (
    CAPABILITY,
    ChatCompletionRequest,
    parse_body,
    served_entry,
    to_work,
)
from tasks.contracts.chat_bodies import (
    choice_body,
    chunk_body,
    chunk_choice,
    completion_body,
    fingerprint,
    new_completion_id,
)
from tasks.errors import LanewayError
from tasks.filestore import FileStore
from tasks.media.image_fetch import ImageFetcher
from tasks.media.images import PixelBudget, release, resolve_image_url, to_wire
from tasks.queue.replies import DONE, ERROR, Reply
from tasks.store.usage import Usage

log = logging.getLogger(__name__)

Disconnected = Callable[[], Awaitable[Any]]


def parse_request(raw: bytes) -> ChatCompletionRequest:
    body, _ = load_json(raw)
    return parse_body(body)


class Images:
    """The images of one request, on their way to a worker (see ``tasks.media.images``)."""

    def __init__(
        self, settings: Settings, store: FileStore, fetcher: ImageFetcher | None = None
    ) -> None:
        self.settings = settings
        self.store = store
        self.fetcher = fetcher
        self.sent: list[dict[str, str]] = []

    async def resolve(self, messages: list[dict[str, Any]]) -> None:
        """Each ``image_url`` part becomes ``{"type": "image", "image": <wire form>}``.

        ``to_work`` has capped their number; their pixels together are capped here."""
        budget = PixelBudget(self.settings)
        for i, message in enumerate(messages):
            content = message.get("content")
            if not isinstance(content, list):
                continue
            for j, part in enumerate(content):
                if part.get("type") != "image_url":
                    continue
                param = f"messages[{i}].content[{j}].image_url.url"
                data, info = await resolve_image_url(
                    part["url"], self.settings, self.fetcher, param=param, budget=budget
                )
                wire = await asyncio.to_thread(to_wire, data, info, self.store, self.settings)
                self.sent.append(wire)
                content[j] = {"type": "image", "image": wire}

    async def discard(self) -> None:
        """The request never reached a worker: delete what was stored for it."""
        for wire in self.sent:
            await asyncio.to_thread(release, wire, self.store)


async def prepare(
    request: ChatCompletionRequest,
    *,
    settings: Settings,
    catalog: Catalog,
    images: Images,
) -> dict[str, Any]:
    """The work payload for the live lane (images resolved and stored)."""
    entry = served_entry(catalog, settings.models, request.model)
    work = to_work(request, entry, settings)
    await images.resolve(work["messages"])
    return work


async def complete(
    request: ChatCompletionRequest,
    work: dict[str, Any],
    *,
    catalog: Catalog,
    live: LiveClient,
    disconnected: Disconnected | None,
) -> bytes:
    """A non-streaming answer: one ``chat.completion``."""
    reply = await live.call(CAPABILITY, work, disconnected=disconnected)
    usage = _usage(reply)
    body = completion_body(
        id=new_completion_id(),
        created=int(time.time()),
        model=request.model,
        choices=[
            choice_body(c["index"], c["text"], c["finish_reason"], c.get("logprobs"))
            for c in reply.header.get("choices", [])
        ],
        usage=usage,
        fingerprint=fingerprint(catalog.get(request.model)),
    )
    return orjson.dumps(body)


def _usage(reply: Reply) -> Usage:
    raw = reply.header.get("usage") or {}
    return Usage(
        prompt_tokens=int(raw.get("prompt_tokens", 0)),
        completion_tokens=int(raw.get("completion_tokens", 0)),
    )


async def open_stream(
    work: dict[str, Any], *, live: LiveClient, disconnected: Disconnected | None
) -> LiveStream:
    """Enqueue a streaming request; raises what fails it before its first event."""
    return await live.stream(CAPABILITY, work, disconnected=disconnected)


async def sse(
    stream: LiveStream,
    request: ChatCompletionRequest,
    work: dict[str, Any],
    catalog: Catalog,
) -> AsyncIterator[bytes]:
    """The stream as Server-Sent Events: a first chunk with the role, one chunk per
    event, the usage chunk when asked, then ``data: [DONE]``."""
    frame = _Frames(request.model, fingerprint(catalog.get(request.model)))
    try:
        yield frame.chunk([chunk_choice(i, role="assistant", content="") for i in range(work["n"])])
        reply = stream.first
        while reply is not None:
            if reply.event == ERROR:
                yield frame.error(LanewayError.from_wire(reply.header.get("error", {})))
                return
            choices = reply.header.get("choices") or []
            if choices:
                yield frame.chunk([_chunk_choice(c) for c in choices])
            if reply.event == DONE:
                if work.get("include_usage"):
                    yield frame.chunk([], usage=_usage(reply))
                yield b"data: [DONE]\n\n"
                return
            reply = await stream.next()
    except LanewayError as exc:  # idle timeout, or a gap in the events
        yield frame.error(exc)
    finally:
        stream.close_soon()


class _Frames:
    def __init__(self, model: str, fp: str) -> None:
        self.id = new_completion_id()
        self.created = int(time.time())
        self.model = model
        self.fingerprint = fp

    def chunk(self, choices: list[dict[str, Any]], usage: Usage | None = None) -> bytes:
        body = chunk_body(
            id=self.id,
            created=self.created,
            model=self.model,
            fingerprint=self.fingerprint,
            choices=choices,
            usage=usage,
        )
        return b"data: " + orjson.dumps(body) + b"\n\n"

    def error(self, exc: LanewayError) -> bytes:
        return b"data: " + orjson.dumps(exc.body()) + b"\n\n"


def _chunk_choice(delta: dict[str, Any]) -> dict[str, Any]:
    return chunk_choice(
        int(delta["index"]),
        content=delta.get("text") or None,
        finish_reason=delta.get("finish_reason"),
        logprobs=delta.get("logprobs"),
    )
