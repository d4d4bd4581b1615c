from __future__ import annotations

import json

from fastapi import APIRouter, Request, Response

from api.deps import StateDep, wait_disconnect
from api.protocol.embeddings import EmbeddingRequest, EmbeddingResponse
from api.protocol.errors import error_responses
from api.serving.embeddings import create_embeddings

router = APIRouter()


@router.post(
    "/v1/embeddings",
    response_model=None,
    responses={
        200: {"model": EmbeddingResponse},
        **error_responses(400, 401, 404, 413, 429, 503, 504),
    },
)
async def embeddings(body: EmbeddingRequest, request: Request, state: StateDep) -> Response:
    request.state.model = body.model
    # serialised here: running 384 floats per input through the response model costs more
    # than the rest of the request
    result = await create_embeddings(
        body,
        settings=state.settings,
        catalog=state.catalog,
        live=state.live,
        disconnected=lambda: wait_disconnect(request),
    )
    return Response(json.dumps(result, separators=(",", ":")), media_type="application/json")
