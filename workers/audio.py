"""The audio capability on the worker: live transcriptions and translations (streamed or
not) and Batch API lines.

A live request names the copy of its upload in the file store (``audio.key``), which
this worker deletes once the request is done; a batch line names a file uploaded with
purpose ``user_data``, which stays the caller's. The speech engine reads a local file:
the store's own with a directory store, a temporary copy (removed once the request is
done) with a remote one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any

from configs.catalog import CatalogEntry, load_catalog
from configs.tracing import TRACE_KEY
from tasks.batches.chunks import Executor
from tasks.batches.lines import Outcome
from tasks.contracts.audio import parse_body, served_entry, to_work, too_large
from tasks.contracts.audio_bodies import outcome_body, usage
from tasks.errors import InvalidRequest, LanewayError
from tasks.filestore import FileStore, LocalFile, get_file_store
from tasks.media.audio_decode import probe
from tasks.queue.names import BATCH, LIVE
from tasks.store import files
from tasks.store.db import session_scope
from workers.audio_engine import SpeechEngine, SpeechResult, Submission
from workers.backends.audio import Segment, SpeechOptions
from workers.jobs import failed
from workers.live import StreamSink
from workers.runtime import WorkerRuntime

log = logging.getLogger(__name__)

# downloads from a remote store in flight at once (a directory store's are instant)
_FETCHES = ThreadPoolExecutor(max_workers=8, thread_name_prefix="audio-fetch")


def make_engine(runtime: WorkerRuntime, entry: CatalogEntry) -> SpeechEngine:
    """The capability registry's entry point for loading a model (off the main thread)."""
    return SpeechEngine.load(entry, runtime.settings, device=runtime.device, gone=runtime.gone)


def options(work: dict[str, Any]) -> SpeechOptions:
    return SpeechOptions(
        task=str(work.get("task", "transcribe")),
        language=work.get("language"),
        prompt=work.get("prompt"),
        temperature=float(work.get("temperature", 0.0)),
        words=bool(work.get("words")),
    )


def segment_wire(seg: Segment) -> dict[str, Any]:
    """A segment as ``tasks.contracts.audio_bodies`` reads it (JSON-able)."""
    return {
        "start": seg.start,
        "end": seg.end,
        "text": seg.text,
        "tokens": list(seg.tokens),
        "temperature": seg.temperature,
        "avg_logprob": seg.avg_logprob,
        "compression_ratio": seg.compression_ratio,
        "no_speech_prob": seg.no_speech_prob,
        "words": [{"word": w.word, "start": w.start, "end": w.end} for w in seg.words],
    }


def result_wire(result: SpeechResult, *, segments: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"language": result.language, "duration": result.duration}
    if segments:
        out["segments"] = [segment_wire(s) for s in result.segments]
    return out


class SpeechLive:
    """``LiveHandler`` for /v1/audio/transcriptions and /v1/audio/translations."""

    def __init__(self, runtime: WorkerRuntime) -> None:
        self.runtime = runtime
        self.store = get_file_store(runtime.settings)

    def submit(self, requests: Sequence[dict[str, Any]], sink: StreamSink) -> list[Future[Any]]:
        keys = [str((r.get("audio") or {}).get("key", "")) for r in requests]
        futures: list[Future[Any]] = []
        for r, key, copy in zip(requests, keys, local_files(self.store, keys), strict=True):
            local = copy if isinstance(copy, LocalFile) else None
            try:
                if not isinstance(copy, LocalFile):
                    raise copy
                sub = Submission(
                    str(copy.path),
                    options(r),
                    request_id=r.get("id"),
                    deadline=r.get("deadline"),
                    sent_at=r.get("sent_at"),
                    trace=r.get(TRACE_KEY),
                    emit=partial(_emit, sink, r) if r.get("stream") else None,
                )
                [future] = self.runtime.engine_as(str(r.get("model")), SpeechEngine).submit_many(
                    [sub], lane=LIVE
                )
            except (LanewayError, ValueError) as exc:
                future = failed(exc if isinstance(exc, LanewayError) else InvalidRequest(str(exc)))
            except Exception as exc:  # the store unreachable, a full disk: this request only
                log.exception("could not start live audio request %s", r.get("id"))
                future = failed(exc)
            future.add_done_callback(partial(_delete, self.store, key, local))
            futures.append(future)
        return futures

    def encode(self, request: dict[str, Any], result: SpeechResult) -> tuple[bytes, dict[str, Any]]:
        # a stream's segments went in its deltas
        return b"", result_wire(result, segments=not request.get("stream"))


def _emit(sink: StreamSink, request: dict[str, Any], segments: list[Segment]) -> None:
    sink.delta(request, segments=[segment_wire(s) for s in segments])


def _local_file(store: FileStore, key: str) -> LocalFile:
    """``key`` as a file the engine can open (downloaded here from a remote store)."""
    try:
        return store.local_file(key)
    except FileNotFoundError:
        raise InvalidRequest("The audio file is no longer in the file store.") from None


def local_files(store: FileStore, keys: Sequence[str]) -> list[LocalFile | Exception]:
    """Each key as a local file, or what failed it: fetched at once, so that a remote
    store's downloads for requests that arrived together overlap."""

    def one(key: str) -> LocalFile | Exception:
        try:
            return _local_file(store, key)
        except Exception as exc:
            return exc

    if len(keys) <= 1:
        return [one(k) for k in keys]
    return list(_FETCHES.map(one, keys))


def _delete(store: FileStore, key: str, local: LocalFile | None, _: object = None) -> None:
    """A live request is done: its local copy and its upload go."""
    try:
        if local is not None:
            local.close()
        if key:
            store.delete(key)
    except Exception:  # a done callback must not raise; the API deletes it too
        log.warning("could not delete the uploaded audio %s", key, exc_info=True)


def live_handler(runtime: WorkerRuntime) -> SpeechLive:
    """The capability registry's entry point for live requests."""
    return SpeechLive(runtime)


def _user_file(file_id: str, owner: str | None, *, max_bytes: int | None = None) -> str:
    """The storage key of a file ``owner`` uploaded with purpose ``user_data`` (a batch
    line's audio); another owner's file is as unknown as one that does not exist, and one
    over ``max_bytes`` is refused as a live upload that large is (413)."""
    with session_scope() as s:
        try:
            row = files.get_file(s, file_id, owner=owner)
        except LanewayError:
            raise InvalidRequest(f"No such File object: {file_id!r}", param="file") from None
        if row.purpose != "user_data":
            raise InvalidRequest(
                f"file {file_id!r} has purpose {row.purpose!r}; audio files for batches are "
                "uploaded with purpose 'user_data'",
                param="file",
            )
        if max_bytes is not None and row.bytes > max_bytes:
            raise too_large(max_bytes)
        return row.storage_key


def _probed(copy: LocalFile | Exception, max_duration_s: float) -> LocalFile | Exception:
    """``copy`` once it passed the live route's check (``probe``: an allowed container
    whose audio decodes, no longer than ``max_duration_s`` by its header), else the
    error of every line naming it, the copy closed. A file too long is refused before any of it is
    transcribed, as it is live."""
    if not isinstance(copy, LocalFile):
        return copy
    try:
        probe(copy.path, max_duration_s=max_duration_s)
    except LanewayError as exc:
        copy.close()
        return exc
    return copy


def batch_executor(runtime: WorkerRuntime) -> Executor:
    """Batch API lines of /v1/audio/transcriptions: parsed and checked like the live
    route, then transcribed on the batch lane (live requests first)."""
    settings = runtime.settings
    catalog = load_catalog(settings.model_config_path)
    store = get_file_store(settings)

    def execute(
        model: str, bodies: list[dict[str, Any]], request_ids: list[str], owner: str | None
    ) -> list[Outcome]:
        works: list[dict[str, Any] | LanewayError] = []
        keys: list[str | None] = []
        for body in bodies:
            try:
                request = parse_body(body)
                entry = served_entry(catalog, settings.models, request.model)
                work = to_work(request, entry, "transcribe", {})
                key = _user_file(request.file, owner, max_bytes=settings.audio_max_bytes)
            except LanewayError as exc:
                works.append(exc)
                keys.append(None)
            else:
                works.append(work)
                keys.append(key)
        unique = list(dict.fromkeys(k for k in keys if k is not None))  # one copy per file
        local = dict(zip(unique, local_files(store, unique), strict=True))
        try:
            max_s = settings.audio_max_duration_s
            local.update({k: _probed(copy, max_s) for k, copy in local.items()})
            subs = _submissions(works, keys, local)
            started = iter(runtime.engine_as(model, SpeechEngine).submit_many(subs, lane=BATCH))
            # _outcome waits for each future: every local copy is read when this returns
            return [
                Outcome.error(w) if isinstance(w, LanewayError) else _outcome(w, rid, next(started))
                for w, rid in zip(works, request_ids, strict=True)
            ]
        finally:
            for copy in local.values():
                if isinstance(copy, LocalFile):
                    copy.close()

    return execute


def _submissions(
    works: list[dict[str, Any] | LanewayError],
    keys: list[str | None],
    local: dict[str, LocalFile | Exception],
) -> list[Submission]:
    """The engine's submissions for the lines whose file is here; a line whose file went
    meanwhile becomes its error (in ``works``). Any other failure to fetch a file (the
    store unreachable) fails the whole chunk, which is retried."""
    subs: list[Submission] = []
    for i, (work, key) in enumerate(zip(works, keys, strict=True)):
        if key is None or isinstance(work, LanewayError):
            continue
        copy = local[key]
        if isinstance(copy, LanewayError):
            works[i] = copy
        elif isinstance(copy, Exception):
            raise copy
        else:
            subs.append(Submission(str(copy.path), options(work)))
    return subs


def _outcome(work: dict[str, Any], request_id: str, future: Future[SpeechResult]) -> Outcome:
    try:
        result = future.result()
    except Exception as exc:
        return Outcome.failed(exc, request_id)
    return Outcome(200, outcome_body(work, result_wire(result)), usage(result.duration))
