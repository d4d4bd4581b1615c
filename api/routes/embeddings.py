"""POST /v1/embeddings: HTTP only; the work is in ``api.serving.embeddings``.

Live calls reach it through the gate's direct route (``DIRECT``, see ``api/direct.py``);
the FastAPI route documents the operation in OpenAPI and answers through the same handler
wherever the gate has no direct route for it (both made by ``one_shot``).
"""

from __future__ import annotations

from api.direct import Disconnected
from api.protocol.embeddings import REQUEST_BODY, EmbeddingRequest, EmbeddingResponse
from api.routes import one_shot
from api.serving.embeddings import create_embeddings, parse_request
from api.state import AppState
from tasks.contracts.embeddings import ENDPOINT


async def serve(body: EmbeddingRequest, state: AppState, disconnected: Disconnected) -> bytes:
    return await create_embeddings(
        body,
        settings=state.settings,
        catalog=state.catalog,
        live=state.live,
        disconnected=disconnected,
    )


router, DIRECT = one_shot(
    ENDPOINT,
    parse_request,
    serve,
    name="embeddings",
    response=EmbeddingResponse,
    request_body=REQUEST_BODY,
)
