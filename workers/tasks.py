"""Celery task bodies: registered under the names in ``tasks/names.py``."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from celery import Celery

from tasks.errors import LanewayError
from tasks.names import LIVE, RESULT_CHANNEL_PREFIX, result_key, task_name
from workers.batching import Dropped
from workers.runtime import WorkerRuntime, encode_vector

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


def register(app: Celery, runtime: WorkerRuntime) -> None:
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
