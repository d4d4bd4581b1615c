"""POST /v1/embeddings: HTTP only; the work is in ``api.serving.embeddings``.

Live calls reach ``create`` through the gate's direct route (``DIRECT``, see
``api/direct.py``); the FastAPI route below documents the operation in OpenAPI and
answers through the same ``create`` wherever the gate has no direct route for it.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from api.deps import StateDep, wait_disconnect
from api.direct import DirectRoute, Disconnected
from api.protocol.embeddings import REQUEST_BODY, EmbeddingResponse
from api.protocol.errors import error_responses
from api.serving.embeddings import create_embeddings, parse_request
from api.state import AppState
from tasks.contracts.embeddings import ENDPOINT

router = APIRouter()
PATH = ENDPOINT


async def create(
    state: AppState, raw: bytes, disconnected: Disconnected, scope_state: dict[str, Any]
) -> bytes:
    body = parse_request(raw)
    scope_state["model"] = body.model  # the metrics' model label
    return await create_embeddings(
        body,
        settings=state.settings,
        catalog=state.catalog,
        live=state.live,
        disconnected=disconnected,
    )


DIRECT = DirectRoute("POST", PATH, create)


@router.post(
    PATH,
    response_model=None,
    responses={
        200: {"model": EmbeddingResponse},
        **error_responses(400, 401, 404, 413, 429, 503, 504),
    },
    openapi_extra=REQUEST_BODY,
)
async def embeddings(request: Request, state: StateDep) -> Response:
    content = await create(
        state,
        await request.body(),
        lambda: wait_disconnect(request),
        request.scope.setdefault("state", {}),
    )
    return Response(content, media_type="application/json")
