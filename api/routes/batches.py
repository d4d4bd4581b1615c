from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query
from starlette.concurrency import run_in_threadpool

from api.deps import OwnerDep, QuotaDep, SettingsDep, StateDep
from api.protocol.batches import Batch, BatchList, CreateBatchRequest
from api.protocol.errors import error_responses
from api.serving import batches as serving

router = APIRouter()


@router.post(
    "/v1/batches",
    response_model=None,
    responses={200: {"model": Batch}, **error_responses(400, 401, 404, 413, 429, 503)},
)
async def create_batch(
    body: CreateBatchRequest,
    settings: SettingsDep,
    owner: OwnerDep,
    quota: QuotaDep,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> Any:
    return await run_in_threadpool(serving.create, settings, body, idempotency_key, owner, quota)


@router.get(
    "/v1/batches",
    response_model=None,
    responses={200: {"model": BatchList}, **error_responses(400, 401, 429, 503)},
)
async def list_batches(
    owner: OwnerDep,
    state: StateDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
) -> Any:
    workers = await state.live.registry.warm_counts()
    return await run_in_threadpool(
        serving.listing, limit=limit, after=after, owner=owner, workers=workers
    )


@router.get(
    "/v1/batches/{batch_id}",
    response_model=None,
    responses={200: {"model": Batch}, **error_responses(401, 404, 429, 503)},
)
async def retrieve_batch(batch_id: str, owner: OwnerDep, state: StateDep) -> Any:
    workers = await state.live.registry.warm_counts()
    return await run_in_threadpool(serving.retrieve, batch_id, owner, workers)


@router.post(
    "/v1/batches/{batch_id}/cancel",
    response_model=None,
    responses={200: {"model": Batch}, **error_responses(400, 401, 404, 429, 503)},
)
async def cancel_batch(batch_id: str, owner: OwnerDep) -> Any:
    return await run_in_threadpool(serving.cancel, batch_id, owner)
