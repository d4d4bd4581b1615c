"""Celery task bodies, registered under the names in ``tasks/names.py``, and the worker's
batch runners and reaper."""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from celery import Celery

from configs.catalog import load_catalog
from tasks.batches.chunks import Executor
from tasks.batches.lines import Outcome
from tasks.batches.reaper import reap
from tasks.batches.service import notify
from tasks.batches.work import BatchWork
from tasks.embeddings import embedding_body, normalise_input, parse_body, served_entry
from tasks.errors import InternalError, LanewayError
from tasks.filestore import get_file_store
from tasks.names import BATCH, LIVE, RESULT_CHANNEL_PREFIX, result_key, task_name
from workers.batch_runner import BatchRunner
from workers.batching import Dropped
from workers.runtime import EmbedCall, EmbedResult, WorkerRuntime, encode_vector

log = logging.getLogger(__name__)

RESULT_TTL_S = 120


def answer_live(runtime: WorkerRuntime, request: dict[str, Any]) -> dict[str, Any] | None:
    """Compute one live embeddings request; None when it was dropped (caller gone).

    An unexpected failure reaches the caller as a generic message with the request id;
    its detail goes to this worker's log under the same id."""
    request_id = request["id"]
    try:
        result = runtime.embed(
            request["model"],
            request["input"],
            dimensions=request.get("dimensions"),
            lane=LIVE,
            request_id=request_id,
            deadline=request.get("deadline"),
            sent_at=request.get("sent_at"),
        )
    except Dropped:
        return None
    except LanewayError as exc:
        return {"id": request_id, "ok": False, "error": exc.to_wire()}
    except Exception:
        log.exception("live request %s failed", request_id)
        return {
            "id": request_id,
            "ok": False,
            "error": InternalError.for_request(request_id).to_wire(),
        }
    return {
        "id": request_id,
        "ok": True,
        "data": [encode_vector(v) for v in result.vectors],
        "prompt_tokens": result.prompt_tokens,
    }


def _embedding_outcome(
    model: str, encoding: str, result: EmbedResult | BaseException, request_id: str
) -> Outcome:
    if isinstance(result, LanewayError):
        return Outcome.error(result)
    if isinstance(result, BaseException):
        log.error("batch request %s failed", request_id, exc_info=result)
        return Outcome.internal(request_id)
    vectors: list[Any] = (
        [encode_vector(v) for v in result.vectors]
        if encoding == "base64"
        else [v.tolist() for v in result.vectors]
    )
    return Outcome(200, embedding_body(model, vectors, result.prompt_tokens), result.prompt_tokens)


def embeddings_executor(runtime: WorkerRuntime) -> Executor:
    """Batch API lines of /v1/embeddings: parsed and checked like the live route, then
    computed together on the batch lane, each request on its own."""
    settings = runtime.settings
    catalog = load_catalog(settings.model_config_path)

    def execute(model: str, bodies: list[dict[str, Any]], request_ids: list[str]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(bodies)
        parsed: list[tuple[int, str]] = []
        calls: list[EmbedCall] = []
        for n, body in enumerate(bodies):
            try:
                request = parse_body(body)
                served_entry(catalog, settings.models, request.model)
                items = normalise_input(request, settings.max_embedding_inputs)
            except LanewayError as exc:
                outcomes[n] = Outcome.error(exc)
                continue
            parsed.append((n, request.encoding_format))
            calls.append(EmbedCall(items, request.dimensions))
        results = runtime.embed_many(model, calls, lane=BATCH)
        for (n, encoding), result in zip(parsed, results, strict=True):
            outcomes[n] = _embedding_outcome(model, encoding, result, request_ids[n])
        return [o for o in outcomes if o is not None]

    return execute


EXECUTORS = {"embeddings": embeddings_executor}


def make_batch_runner(runtime: WorkerRuntime) -> BatchRunner:
    settings = runtime.settings
    work = BatchWork(
        settings=settings,
        store=get_file_store(settings),
        catalog=load_catalog(settings.model_config_path),
        capability=runtime.capability,
        models=list(runtime.entries),
        execute=EXECUTORS[runtime.capability](runtime),
        notify=notify,
    )
    return BatchRunner(work, threads=settings.batch_chunks_in_flight, poll_s=settings.batch_poll_s)


def register(app: Celery, runtime: WorkerRuntime, runner: BatchRunner) -> None:
    capability = runtime.capability

    @app.task(name=task_name(capability, LIVE), ignore_result=True, acks_late=False)
    def live(request: dict[str, Any]) -> None:
        deadline = request.get("deadline")
        if deadline is not None and deadline < time.time():
            log.info("dropping %s: deadline passed before it was picked up", request.get("id"))
            return
        reply = answer_live(runtime, request)
        if reply is None:
            log.info("dropped %s: caller gone", request["id"])
            return
        body = json.dumps(reply)
        pipe = runtime.redis.pipeline(transaction=False)
        pipe.set(result_key(request["id"]), body, ex=RESULT_TTL_S)
        pipe.publish(RESULT_CHANNEL_PREFIX + request["reply_to"], body)
        pipe.execute()

    # a hint that a batch has work: wake the runners and return (no pool thread waits)
    @app.task(name=task_name(capability, BATCH), ignore_result=True, acks_late=False)
    def batch(batch_id: str | None = None) -> None:
        runner.wake()


def start_reaper(
    runtime: WorkerRuntime, runner: BatchRunner, stop: threading.Event
) -> threading.Thread:
    """Every worker runs one: the database decides, so several reapers do no harm."""
    settings = runtime.settings
    store = get_file_store(settings)

    def loop() -> None:
        while not stop.wait(settings.reaper_interval_s):
            try:
                if reap(store=store):
                    runner.wake()
            except Exception:
                log.exception("reaper pass failed")

    thread = threading.Thread(target=loop, name="reaper", daemon=True)
    thread.start()
    return thread
