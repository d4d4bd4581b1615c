from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query
from starlette.concurrency import run_in_threadpool

from api.deps import SettingsDep
from api.protocol.batches import CreateBatchRequest
from api.serving import batches as serving

router = APIRouter()


@router.post("/v1/batches")
async def create_batch(
    body: CreateBatchRequest,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> Any:
    return await run_in_threadpool(serving.create, settings, body, idempotency_key)


@router.get("/v1/batches")
async def list_batches(
    limit: Annotated[int, Query(ge=1, le=100)] = 20, after: str | None = None
) -> Any:
    return await run_in_threadpool(serving.listing, limit=limit, after=after)


@router.get("/v1/batches/{batch_id}")
async def retrieve_batch(batch_id: str) -> Any:
    return await run_in_threadpool(serving.retrieve, batch_id)


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str) -> Any:
    return await run_in_threadpool(serving.cancel, batch_id)
