"""POST /v1/rerank: HTTP only; the work is in ``api.serving.rerank``.

The gate answers live calls through the direct route (``DIRECT``, see ``api/direct.py``);
the FastAPI route documents the operation in OpenAPI and answers through the same
handler wherever the gate has none (both made by ``one_shot``).
"""

from __future__ import annotations

from api.protocol.rerank import REQUEST_BODY, RerankResponse
from api.routes import one_shot
from api.serving.rerank import create_rerank, parse_request
from tasks.contracts.rerank import ENDPOINT

router, DIRECT = one_shot(
    ENDPOINT,
    parse_request,
    create_rerank,
    name="rerank",
    response=RerankResponse,
    request_body=REQUEST_BODY,
)
