"""The chat capability on the worker: live requests (streamed or not) and Batch API lines.

Images arrive as file-store references or inline bytes (``tasks.images.to_wire``) in
live messages, and as the caller's ``image_url`` in batch lines, fetched here with the
same checks as the API's. Stored copies are deleted once their request is done.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import Any

from configs.catalog import CatalogEntry, load_catalog
from tasks.batches.chunks import Executor
from tasks.batches.lines import Outcome
from tasks.chat import parse_body, served_entry, to_work
from tasks.chat_bodies import choice_body, completion_body, fingerprint
from tasks.errors import InvalidRequest, LanewayError
from tasks.filestore import FileStore, get_file_store
from tasks.images import PixelBudget, from_wire, release, resolve_image_url_sync
from tasks.names import BATCH, LIVE, Lane
from tasks.usage import Usage
from workers.batching import JobMeta, failed
from workers.chat_engine import ChatEngine, ChatResult, Submission
from workers.live import StreamSink
from workers.runtime import WorkerRuntime

log = logging.getLogger(__name__)


def make_engine(runtime: WorkerRuntime, entry: CatalogEntry) -> ChatEngine:
    """The capability registry's entry point for loading a model (off the main thread)."""
    return ChatEngine.load(entry, runtime.settings, device=runtime.device, gone=runtime.gone)


class Images:
    """A request's images: the messages with each image part made ``{"type": "image"}``
    (what chat templates expect), the bytes in order, the stored copies to delete."""

    def __init__(self, runtime: WorkerRuntime, store: FileStore) -> None:
        self.runtime = runtime
        self.store = store

    @staticmethod
    def refs_of(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """The stored copies the API sent a request's images as: deleted once the request
        is done, whatever happens to it (also when taking its images fails half-way)."""
        return [
            part["image"]
            for message in messages
            if isinstance(content := message.get("content"), list)
            for part in content
            if isinstance(part, dict)
            and part.get("type") == "image"
            and isinstance(part.get("image"), dict)
            and "ref" in part["image"]
        ]

    def take(self, messages: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[bytes]]:
        out: list[dict[str, Any]] = []
        images: list[bytes] = []
        # a batch line's images, capped together as the API caps a live request's
        # (``to_work`` has capped their number)
        budget = PixelBudget(self.runtime.settings)
        for i, message in enumerate(messages):
            content = message.get("content")
            if not isinstance(content, list):
                out.append(dict(message))
                continue
            parts: list[dict[str, Any]] = []
            for j, part in enumerate(content):
                if part.get("type") == "image":  # from the API: bytes inline or stored
                    images.append(self._stored(part["image"]))
                elif part.get("type") == "image_url":  # from a batch line: fetched here
                    param = f"messages[{i}].content[{j}].image_url.url"
                    data, _ = resolve_image_url_sync(
                        str(part.get("url")), self.runtime.settings, param=param, budget=budget
                    )
                    images.append(data)
                else:
                    parts.append(part)
                    continue
                parts.append({"type": "image"})
            out.append({**message, "content": parts})
        return out, images

    def _stored(self, wire: dict[str, Any]) -> bytes:
        try:
            return from_wire(wire, self.store)
        except (OSError, ValueError) as exc:  # deleted meanwhile, or not an image reference
            # the error's text names the store's path: the log has it, the caller does not
            log.warning("an image of a request could not be read: %s", exc)
            raise InvalidRequest("an image of the request is gone", param="messages") from None

    def release(self, refs: list[dict[str, Any]], _: object = None) -> None:
        for ref in refs:
            try:
                release(ref, self.store)
            except Exception:
                log.warning("could not delete a stored image %s", ref.get("ref"))


@dataclass(frozen=True)
class Request:
    work: dict[str, Any]
    meta: JobMeta
    emit: Any = None


def submit_all(
    runtime: WorkerRuntime, images: Images, requests: Sequence[Request], *, lane: Lane
) -> list[Future[ChatResult]]:
    """Requests on their models' engines, those of one model in one submission (so the
    ones that arrived together start together); stored images are deleted once done."""
    futures: list[Future[ChatResult]] = [Future() for _ in requests]
    by_model: dict[str, list[tuple[int, Submission, list[dict[str, Any]]]]] = {}
    for n, request in enumerate(requests):
        refs = Images.refs_of(request.work["messages"])
        try:
            runtime.engine_as(str(request.work.get("model")), ChatEngine)
            messages, data = images.take(request.work["messages"])
        except Exception as exc:  # this request alone fails
            if not isinstance(exc, LanewayError):
                log.exception("could not take the images of chat request %s", request.meta)
            images.release(refs)
            futures[n].set_exception(exc)
            continue
        sub = Submission({**request.work, "messages": messages}, data, request.meta, request.emit)
        by_model.setdefault(str(request.work["model"]), []).append((n, sub, refs))
    for model, items in by_model.items():
        started = runtime.engine_as(model, ChatEngine).submit_many(
            [sub for _, sub, _ in items], lane=lane
        )
        for (n, _, refs), future in zip(items, started, strict=True):
            futures[n] = future
            if refs:
                future.add_done_callback(partial(images.release, refs))
    return futures


class ChatLive:
    """``LiveHandler`` for /v1/chat/completions."""

    def __init__(self, runtime: WorkerRuntime) -> None:
        self.runtime = runtime
        self.images = Images(runtime, get_file_store(runtime.settings))

    def submit(self, requests: Sequence[dict[str, Any]], sink: StreamSink) -> list[Future[Any]]:
        todo = [
            Request(
                r,
                JobMeta(r["id"], r.get("deadline"), r.get("sent_at")),
                partial(_emit, sink, r) if r.get("stream") else None,
            )
            for r in requests
        ]
        return list(submit_all(self.runtime, self.images, todo, lane=LIVE))

    def encode(self, request: dict[str, Any], result: ChatResult) -> tuple[bytes, dict[str, Any]]:
        usage = {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
        }
        if request.get("stream"):  # the text went in the deltas
            return b"", {"usage": usage}
        return b"", {"choices": result.choices, "usage": usage}


def _emit(sink: StreamSink, request: dict[str, Any], choices: list[dict[str, Any]]) -> None:
    sink.delta(request, choices=choices)


def live_handler(runtime: WorkerRuntime) -> ChatLive:
    """The capability registry's entry point for live requests."""
    return ChatLive(runtime)


def _outcome(entry: CatalogEntry, request_id: str, result: ChatResult | BaseException) -> Outcome:
    if isinstance(result, LanewayError):
        return Outcome.error(result)
    if isinstance(result, BaseException):
        log.error("batch request %s failed", request_id, exc_info=result)
        return Outcome.internal(request_id)
    usage = Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens)
    body = completion_body(
        id=f"chatcmpl-{request_id.removeprefix('req_')}",
        created=int(time.time()),
        model=entry.id,
        choices=[
            choice_body(c["index"], c["text"], c["finish_reason"], c["logprobs"])
            for c in result.choices
        ],
        usage=usage,
        fingerprint=fingerprint(entry),
    )
    return Outcome(200, body, usage)


def batch_executor(runtime: WorkerRuntime) -> Executor:
    """Batch API lines of /v1/chat/completions: parsed and checked like the live route,
    then generated together on the batch lane (live requests are admitted first)."""
    settings = runtime.settings
    catalog = load_catalog(settings.model_config_path)
    images = Images(runtime, get_file_store(settings))

    def execute(
        model: str, bodies: list[dict[str, Any]], request_ids: list[str], _owner: str | None
    ) -> list[Outcome]:
        entry = catalog.get(model)
        todo: list[Request] = []
        refused: dict[int, LanewayError] = {}
        for n, (body, rid) in enumerate(zip(bodies, request_ids, strict=True)):
            try:
                request = parse_body(body)
                served_entry(catalog, settings.models, request.model)
                work = {**to_work(request, entry, settings), "stream": False}
            except LanewayError as exc:
                refused[n] = exc
                continue
            todo.append(Request(work, JobMeta(rid)))
        started = iter(submit_all(runtime, images, todo, lane=BATCH))
        futures = [
            failed(refused[n]) if n in refused else next(started) for n in range(len(bodies))
        ]
        outcomes: list[Outcome] = []
        for rid, future in zip(request_ids, futures, strict=True):
            try:
                result: ChatResult | BaseException = future.result()
            except Exception as exc:
                result = exc
            outcomes.append(_outcome(entry, rid, result))
        return outcomes

    return execute
