"""Operator routes: /health and /metrics."""

from __future__ import annotations

import time
from contextlib import suppress
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from api.deps import StateDep
from api.metrics import BROKER, WORKER_STATS, exposition
from api.protocol.errors import error_responses
from api.protocol.ops import HEALTH_RESPONSES, METRICS_RESPONSES
from configs.capabilities import CAPABILITIES
from tasks.batches.service import count_by_status
from tasks.queue.names import LANES, queue_name, worker_metrics_key
from tasks.store.db import session_scope

router = APIRouter()


@router.get("/health", response_class=JSONResponse, responses=HEALTH_RESPONSES)
async def health(state: StateDep, request: Request) -> JSONResponse:
    """Whether every served model is warm; which workers serve each (host names and pids),
    on which engines and devices, only for a caller the API key lets through (the gate
    marks it ``authenticated``)."""
    detail = bool(request.scope.get("state", {}).get("authenticated"))
    models: dict[str, Any] = {}
    try:
        await state.live.registry.workers(fresh=True)
        for model in state.settings.models:
            warm, live = await state.live.registry.model_status(model)
            models[model] = {
                "warm": bool(warm),
                "engines": await state.live.registry.engines(model),
                "devices": await state.live.registry.devices(model),
                "workers": live,
                "warm_workers": warm,
            }
        broker = "ok"
    except (RedisError, OSError) as exc:
        broker = f"unreachable: {type(exc).__name__}"
        models = {
            m: {"warm": False, "engines": [], "devices": [], "workers": [], "warm_workers": []}
            for m in state.settings.models
        }
    ok = broker == "ok" and all(m["warm"] for m in models.values())
    if not detail:
        models = {m: {"warm": v["warm"]} for m, v in models.items()}
    return JSONResponse(
        {"status": "ok" if ok else "unavailable", "broker": broker, "models": models},
        status_code=200 if ok else 503,
    )


@router.get(
    "/metrics", response_class=Response, responses={**METRICS_RESPONSES, **error_responses(401)}
)
async def metrics(state: StateDep) -> Response:
    try:
        queues = [queue_name(c, lane) for c in CAPABILITIES for lane in LANES]
        pipe = state.redis.pipeline(transaction=False)
        for q in queues:
            pipe.llen(q)
        BROKER.depths = dict(zip(queues, await pipe.execute(), strict=True))
        workers = await state.live.registry.workers(fresh=True)
        counts = {}
        for model in state.settings.models:
            warm, live = await state.live.registry.model_status(model)
            counts[model] = (len(warm), len(live) - len(warm))
        BROKER.workers = counts
        keys = [worker_metrics_key(w["id"]) for w in workers]
        WORKER_STATS.update(await state.redis.mget(keys) if keys else [])
    except (RedisError, OSError):
        pass  # serve what the API itself knows
    with suppress(SQLAlchemyError):  # the database down: the other numbers still serve
        BROKER.batches = await run_in_threadpool(_batch_counts)
    return Response(exposition(), media_type=CONTENT_TYPE_LATEST)


# the finished batches are every batch there ever was: counted at most this often per
# process, not on every scrape (the open ones are, from a range of the status index)
FINISHED_COUNTS_EVERY_S = 300.0
_finished: tuple[float, dict[str, int]] = (float("-inf"), {})


def _batch_counts() -> dict[str, int]:
    global _finished
    with session_scope() as s:
        counts = count_by_status(s)
        counted_at, finished = _finished
        if time.monotonic() - counted_at >= FINISHED_COUNTS_EVERY_S:
            finished = count_by_status(s, finished=True)
            _finished = (time.monotonic(), finished)
    return {**counts, **finished}
