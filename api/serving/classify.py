"""/v1/classify: parse and check, enqueue on the live lane, shape the answer.

The worker answers the response's ``data`` (it knows the model's labels); the rest of
the response is the contract's ``classification_body``, the one Batch API lines get.
"""

from __future__ import annotations

import time
import uuid

import orjson

from api.direct import Disconnected
from api.serving import live_rows, load_json
from api.state import AppState
from tasks.contracts.classify import (
    CAPABILITY,
    ClassificationRequest,
    classification_body,
    input_texts,
    parse_body,
    served_entry,
)

__all__ = ["create_classification", "parse_request"]


def parse_request(raw: bytes) -> ClassificationRequest:
    return parse_body(load_json(raw)[0])


async def create_classification(
    request: ClassificationRequest, state: AppState, disconnected: Disconnected | None = None
) -> bytes:
    """The response body, as bytes."""
    entry = served_entry(state.catalog, state.settings.models, request.model)
    texts = input_texts(request, entry)
    payload = {"model": entry.id, "input": texts}
    data, tokens = await live_rows(state, CAPABILITY, payload, len(texts), disconnected)
    response_id = f"classify-{uuid.uuid4().hex}"
    body = classification_body(response_id, request.model, int(time.time()), data, tokens)
    return orjson.dumps(body)
