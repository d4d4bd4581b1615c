"""Celery task bodies, registered under the names in ``tasks/names.py``."""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from celery import Celery

from configs.catalog import load_catalog
from tasks import batches
from tasks.batches import ADVANCE_TASK, Executor, Outcome
from tasks.embeddings import (
    embedding_body,
    normalise_input,
    parse_body,
    served_entry,
)
from tasks.errors import LanewayError
from tasks.filestore import get_file_store
from tasks.names import BATCH, LIVE, RESULT_CHANNEL_PREFIX, result_key, task_name
from workers.batching import Dropped
from workers.runtime import EmbedCall, WorkerRuntime, encode_vector

log = logging.getLogger(__name__)

RESULT_TTL_S = 120


def answer_live(runtime: WorkerRuntime, request: dict[str, Any]) -> dict[str, Any] | None:
    """Compute one live embeddings request; None when it was dropped (caller gone)."""
    try:
        result = runtime.embed(
            request["model"],
            request["input"],
            dimensions=request.get("dimensions"),
            lane=LIVE,
            request_id=request["id"],
            deadline=request.get("deadline"),
            sent_at=request.get("sent_at"),
        )
    except Dropped:
        return None
    except LanewayError as exc:
        return {"id": request["id"], "ok": False, "error": exc.to_wire()}
    except Exception as exc:
        log.exception("live request %s failed", request.get("id"))
        return {"id": request["id"], "ok": False, "error": LanewayError(str(exc)).to_wire()}
    return {
        "id": request["id"],
        "ok": True,
        "data": [encode_vector(v) for v in result.vectors],
        "prompt_tokens": result.prompt_tokens,
    }


def error_outcome(exc: LanewayError) -> Outcome:
    return Outcome(
        exc.status_code,
        {
            "error": {
                "message": exc.message,
                "type": exc.error_type,
                "param": exc.param,
                "code": exc.code,
            }
        },
    )


def embeddings_executor(runtime: WorkerRuntime) -> Executor:
    """Batch API lines of /v1/embeddings: parsed and checked like the live route, then
    computed together on the batch lane."""
    settings = runtime.settings
    catalog = load_catalog(settings.model_config_path)

    def execute(model: str, bodies: list[dict[str, Any]], renew: Any) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(bodies)
        parsed: list[tuple[int, str]] = []
        calls: list[EmbedCall] = []
        for n, body in enumerate(bodies):
            try:
                request = parse_body(body)
                served_entry(catalog, settings.models, request.model)
                items = normalise_input(request, settings.max_embedding_inputs)
            except LanewayError as exc:
                outcomes[n] = error_outcome(exc)
                continue
            parsed.append((n, request.encoding_format))
            calls.append(EmbedCall(items, request.dimensions))
        results = runtime.embed_many(
            model, calls, lane=BATCH, on_wait=renew, wait_interval_s=settings.chunk_lease_s / 3
        )
        for (n, encoding), result in zip(parsed, results, strict=True):
            if isinstance(result, LanewayError):
                outcomes[n] = error_outcome(result)
                continue
            vectors: list[Any] = (
                [encode_vector(v) for v in result.vectors]
                if encoding == "base64"
                else [v.tolist() for v in result.vectors]
            )
            outcomes[n] = Outcome(
                200, embedding_body(model, vectors, result.prompt_tokens), result.prompt_tokens
            )
        return [o for o in outcomes if o is not None]

    return execute


EXECUTORS = {"embeddings": embeddings_executor}


def register(app: Celery, runtime: WorkerRuntime) -> None:
    capability = runtime.capability
    settings = runtime.settings
    store = get_file_store(settings)
    catalog = load_catalog(settings.model_config_path)
    execute = EXECUTORS[capability](runtime)
    in_flight = threading.Semaphore(settings.batch_chunks_in_flight)

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

    # chunks are idempotent (fenced commits), so redelivery after a crash is safe
    @app.task(
        name=task_name(capability, BATCH),
        ignore_result=True,
        acks_late=True,
        reject_on_worker_lost=True,
    )
    def chunk(chunk_id: int) -> None:
        with in_flight:
            batches.run_chunk(chunk_id, settings=settings, store=store, execute=execute)

    @app.task(name=ADVANCE_TASK, ignore_result=True, acks_late=True, reject_on_worker_lost=True)
    def advance(batch_id: str) -> None:
        batches.advance(batch_id, settings=settings, store=store, catalog=catalog)


def start_reaper(runtime: WorkerRuntime, stop: threading.Event) -> threading.Thread:
    """Every worker runs one: the database decides, so several reapers do no harm."""
    settings = runtime.settings
    store = get_file_store(settings)
    catalog = load_catalog(settings.model_config_path)

    def loop() -> None:
        while not stop.wait(settings.reaper_interval_s):
            try:
                batches.reap(settings=settings, store=store, catalog=catalog)
            except Exception:
                log.exception("reaper pass failed")

    thread = threading.Thread(target=loop, name="reaper", daemon=True)
    thread.start()
    return thread
