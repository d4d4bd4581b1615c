from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from api.deps import StateDep, wait_disconnect
from api.protocol.embeddings import EmbeddingRequest, EmbeddingResponse
from api.serving.embeddings import create_embeddings

router = APIRouter()


@router.post("/v1/embeddings", response_model=EmbeddingResponse)
async def embeddings(body: EmbeddingRequest, request: Request, state: StateDep) -> Any:
    request.state.model = body.model
    return await create_embeddings(
        body,
        settings=state.settings,
        catalog=state.catalog,
        live=state.live,
        disconnected=lambda: wait_disconnect(request),
    )
