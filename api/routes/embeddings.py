from __future__ import annotations

from fastapi import APIRouter, Request, Response

from api.deps import StateDep, wait_disconnect
from api.protocol.embeddings import REQUEST_BODY, EmbeddingResponse
from api.protocol.errors import error_responses
from api.serving.embeddings import create_embeddings, parse_request

router = APIRouter()


@router.post(
    "/v1/embeddings",
    response_model=None,
    responses={
        200: {"model": EmbeddingResponse},
        **error_responses(400, 401, 404, 413, 429, 503, 504),
    },
    openapi_extra=REQUEST_BODY,
)
async def embeddings(request: Request, state: StateDep) -> Response:
    body = parse_request(await request.body())
    request.state.model = body.model
    content = await create_embeddings(
        body,
        settings=state.settings,
        catalog=state.catalog,
        live=state.live,
        disconnected=lambda: wait_disconnect(request),
    )
    return Response(content, media_type="application/json")
