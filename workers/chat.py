"""The chat capability on the worker: live requests (streamed or not) and Batch API lines.

Images arrive as file-store references or inline bytes (``tasks.media.images.to_wire``) in
live messages, and as the caller's ``image_url`` in batch lines, fetched here with the
same checks as the API's. Stored copies are deleted once their request is done.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError, wait
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, runtime_checkable

from configs.capabilities import REGISTRY
from configs.catalog import CatalogEntry, load_catalog
from tasks.batches.chunks import Executor
from tasks.batches.lines import Outcome
from tasks.contracts.chat import ChatLimits, parse_body, served_entry, to_work
from tasks.contracts.chat_bodies import choice_body, completion_body, fingerprint
from tasks.errors import InvalidRequest, LanewayError
from tasks.filestore import FileStore, get_file_store
from tasks.media.images import PixelBudget, from_wire, release, resolve_image_url_sync
from tasks.queue.names import BATCH, LIVE, Lane
from tasks.store.usage import Usage
from workers.chat_engine import ChatEngine, ChatResult, Submission
from workers.chat_vllm import VllmChatEngine
from workers.chat_vllm import available as vllm_available
from workers.jobs import JobMeta, failed
from workers.live import StreamSink
from workers.runtime import WorkerRuntime

log = logging.getLogger(__name__)


@runtime_checkable
class ChatScheduler(Protocol):
    """What serves one chat model: laneway's own ``ChatEngine`` or ``VllmChatEngine``."""

    entry: CatalogEntry

    def submit_many(
        self, submissions: Sequence[Submission], *, lane: Lane = LIVE
    ) -> list[Future[ChatResult]]: ...


def make_engine(runtime: WorkerRuntime, entry: CatalogEntry) -> ChatScheduler:
    """The capability registry's entry point for loading a model (off the main thread):
    on vLLM when the entry (or LANEWAY_CHAT_ENGINE, for entries that name none) asks for
    it, or leaves it to ``auto`` and vLLM is installed (the ``vllm`` extra) and starts;
    else on laneway's own engine, saying why in the log."""
    settings, device, gone = runtime.settings, runtime.device, runtime.gone
    wanted = engine_wanted(entry, settings.chat_engine)
    if wanted != "transformers":
        try:
            return VllmChatEngine.load(entry, settings, device=device, gone=gone)
        except Exception:
            if wanted == "vllm":
                raise
            log.exception("%s: vLLM could not serve it; laneway's own engine does", entry.id)
    return ChatEngine.load(entry, settings, device=device, gone=gone)


def engine_wanted(entry: CatalogEntry, default: str) -> str:
    """``vllm``, ``auto`` (vLLM, falling back to our own) or ``transformers``."""
    wanted = ChatLimits.from_entry(entry).engine
    if wanted == "auto":
        wanted = default
    if wanted == "transformers":
        return wanted
    if entry.backend != REGISTRY["chat"].default_backend:
        say = log.warning if wanted == "vllm" else log.info
        say("%s: a backend of its own (%s), not vLLM", entry.id, entry.backend)
        return "transformers"
    missing = vllm_available()
    if missing is None:
        return wanted
    if wanted == "vllm":
        log.warning(
            "%s asks for vLLM, but vLLM is not available (%s): laneway's own engine serves it",
            entry.id,
            missing,
        )
    else:
        log.info("%s on laneway's own chat engine: vLLM is not available (%s)", entry.id, missing)
    return "transformers"


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
            runtime.engine_as(str(request.work.get("model")), ChatScheduler)  # type: ignore[type-abstract]
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
        started = runtime.engine_as(model, ChatScheduler).submit_many(  # type: ignore[type-abstract]
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
                JobMeta.of(r),
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
    if isinstance(result, BaseException):
        return Outcome.failed(result, request_id)
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


def wait_all(futures: Sequence[Future[Any]], timeout_s: float) -> None:
    """Wait for every future, ``timeout_s`` at most: past it, those not done are failed
    (the engines skip and abort a job whose future is done) and ``TimeoutError`` gives the
    chunk back, to be retried within its bounded attempts."""
    _, pending = wait(futures, timeout=timeout_s)
    if not pending:
        return
    for future in pending:
        if not future.done():
            with contextlib.suppress(InvalidStateError):
                future.set_exception(TimeoutError("the chat engine did not finish in time"))
    raise TimeoutError(
        f"{len(pending)} of {len(futures)} chat lines unfinished after {timeout_s:.0f} s"
    )


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
            todo.append(Request(work, JobMeta.line(rid)))
        started = iter(submit_all(runtime, images, todo, lane=BATCH))
        futures = [
            failed(refused[n]) if n in refused else next(started) for n in range(len(bodies))
        ]
        wait_all(futures, settings.chat_chunk_timeout_s)
        return [
            _outcome(entry, rid, f.exception() or f.result())
            for rid, f in zip(request_ids, futures, strict=True)
        ]

    return execute
