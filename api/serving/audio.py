"""/v1/audio/transcriptions and /translations: take the upload into the file store, check
it decodes, enqueue a reference on the live lane, and shape the answer (the requested
``response_format``, or Server-Sent Events of ``transcript.text.delta`` and one
``transcript.text.done``).

The stored copy is deleted when the request ends, whatever the outcome: by the worker
when it is done with it, and by the API once the reply (or the stream) is over, which
also covers a worker that died holding it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request

from api.live import LiveClient, LiveStream
from configs.catalog import Catalog
from configs.settings import Settings
from tasks.contracts.audio import (
    CAPABILITY,
    AudioRequest,
    parse_form,
    served_entry,
    to_work,
    too_large,
)
from tasks.contracts.audio_bodies import delta_event, done_event, render
from tasks.errors import InvalidRequest, LanewayError
from tasks.filestore import FileStore
from tasks.media.audio_decode import probe
from tasks.queue.replies import DONE, ERROR, Reply

log = logging.getLogger(__name__)

Disconnected = Callable[[], Awaitable[Any]]
MAX_FIELDS = 32
# a reply may take this long per second of audio beyond LANEWAY_REQUEST_TIMEOUT_S (a
# slow CPU transcribes a second of speech in well under a second)
TIMEOUT_PER_AUDIO_S = 1.0


class Upload:
    """One request's audio in the file store, deleted with ``discard``."""

    def __init__(self, store: FileStore) -> None:
        self.store = store
        self.key = f"audio/{uuid.uuid4().hex}"
        self.duration: float | None = None

    async def save(self, upload: UploadFile, settings: Settings) -> None:
        """Store the upload, then check that it decodes: read in place from a directory
        store, from the copy the upload was written from on a remote one."""
        try:
            size, local = await asyncio.to_thread(
                self.store.write_keeping_local,
                self.key,
                upload.file,
                limit=settings.audio_max_bytes,
            )
        except OverflowError:
            raise too_large(settings.audio_max_bytes) from None
        try:
            if size == 0:
                raise InvalidRequest("The audio file is empty.", param="file")
            max_s = settings.audio_max_duration_s
            info = await asyncio.to_thread(probe, local.path, max_duration_s=max_s)
        finally:
            local.close()
        self.duration = info.duration

    async def discard(self) -> None:
        try:
            await asyncio.to_thread(self.store.delete, self.key)
        except Exception:  # a local or a remote store's error; the worker deletes it too
            log.warning("could not delete uploaded audio %s", self.key, exc_info=True)


def _fields(form: FormData) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            continue
        if key == "timestamp_granularities[]":
            fields.setdefault(key, []).append(value)
        else:
            fields[key] = value
    return fields


async def receive(
    request: Request, *, task: str, settings: Settings, catalog: Catalog, upload: Upload
) -> tuple[AudioRequest, dict[str, Any]]:
    """The request's fields checked, then its file stored and probed: the work payload."""
    async with request.form(max_files=1, max_fields=MAX_FIELDS) as form:
        body = parse_form(_fields(form))
        request.scope.setdefault("state", {})["model"] = body.model  # metrics' model label
        entry = served_entry(catalog, settings.models, body.model)
        work = to_work(body, entry, task, {"key": upload.key})
        file = form.get("file")
        if not isinstance(file, UploadFile):
            raise InvalidRequest("Missing required parameter: 'file'.", param="file")
        await upload.save(file, settings)
    return body, work


async def complete(
    work: dict[str, Any],
    *,
    settings: Settings,
    live: LiveClient,
    duration: float | None,
    disconnected: Disconnected | None,
) -> tuple[bytes, str]:
    """A non-streamed answer in the request's format, and its media type."""
    timeout = settings.request_timeout_s + TIMEOUT_PER_AUDIO_S * (duration or 0.0)
    reply = await live.call(CAPABILITY, work, disconnected=disconnected, timeout=timeout)
    return render(work, reply.header)


async def open_stream(
    work: dict[str, Any], *, live: LiveClient, disconnected: Disconnected | None
) -> LiveStream:
    """Enqueue a streamed request; raises what fails it before its first event."""
    return await live.stream(CAPABILITY, work, disconnected=disconnected)


async def sse(stream: LiveStream, upload: Upload) -> AsyncIterator[bytes]:
    """Each finished segment's text as a ``transcript.text.delta``, then the whole text
    in ``transcript.text.done`` (the deltas concatenate to it)."""
    texts: list[str] = []
    try:
        reply: Reply | None = stream.first
        while reply is not None:
            if reply.event == ERROR:
                yield _error(LanewayError.from_wire(reply.header.get("error", {})))
                return
            for segment in reply.header.get("segments") or ():
                text = str(segment.get("text", ""))
                text = text if texts else text.lstrip()
                if text:
                    texts.append(text)
                    yield delta_event(text)
            if reply.event == DONE:
                yield done_event("".join(texts).strip(), float(reply.header.get("duration", 0)))
                return
            reply = await stream.next()
    except LanewayError as exc:  # idle timeout, or a gap in the events
        yield _error(exc)
    finally:
        stream.close_soon()
        await upload.discard()


def _error(exc: LanewayError) -> bytes:
    return b"data: " + orjson.dumps(exc.body()) + b"\n\n"
