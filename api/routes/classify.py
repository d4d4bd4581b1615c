"""POST /v1/classify: HTTP only; the work is in ``api.serving.classify``, the direct
route and the documented FastAPI route made by ``one_shot``."""

from __future__ import annotations

from api.protocol.classify import REQUEST_BODY, ClassificationResponse
from api.routes import one_shot
from api.serving.classify import create_classification, parse_request
from tasks.contracts.classify import ENDPOINT

router, DIRECT = one_shot(
    ENDPOINT,
    parse_request,
    create_classification,
    name="classify",
    response=ClassificationResponse,
    request_body=REQUEST_BODY,
)
