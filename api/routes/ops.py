"""Operator routes: /health and /metrics."""

from __future__ import annotations

from contextlib import suppress
from typing import Any

from fastapi import APIRouter
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
from tasks.db import session_scope
from tasks.names import LANES, queue_name, worker_metrics_key

router = APIRouter()


@router.get("/health", response_class=JSONResponse, responses=HEALTH_RESPONSES)
async def health(state: StateDep) -> JSONResponse:
    models: dict[str, Any] = {}
    try:
        await state.live.registry.workers(fresh=True)
        for model in state.settings.models:
            warm, live = await state.live.registry.model_status(model)
            models[model] = {"warm": bool(warm), "workers": live, "warm_workers": warm}
        broker = "ok"
    except (RedisError, OSError) as exc:
        broker = f"unreachable: {type(exc).__name__}"
        models = {
            m: {"warm": False, "workers": [], "warm_workers": []} for m in state.settings.models
        }
    ok = broker == "ok" and all(m["warm"] for m in models.values())
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


def _batch_counts() -> dict[str, int]:
    with session_scope() as s:
        return count_by_status(s)
