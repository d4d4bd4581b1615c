"""/v1/rerank: parse and check, enqueue on the live lane, shape the answer.

The worker answers the documents' scores in input order; the response (sorted, cut to
``top_n``, with or without the texts) is written here by the contract's ``rerank_body``,
the one the Batch API lines get.
"""

from __future__ import annotations

import uuid

import orjson

from api.direct import Disconnected
from api.serving import live_rows, load_json
from api.state import AppState
from tasks.contracts.rerank import (
    CAPABILITY,
    RerankRequest,
    document_texts,
    parse_body,
    rerank_body,
    served_entry,
)

__all__ = ["create_rerank", "live_rows", "parse_request"]


def parse_request(raw: bytes) -> RerankRequest:
    return parse_body(load_json(raw)[0])


async def create_rerank(
    request: RerankRequest, state: AppState, disconnected: Disconnected | None = None
) -> bytes:
    """The response body, as bytes."""
    entry = served_entry(state.catalog, state.settings.models, request.model)
    texts = document_texts(request, entry)
    payload = {"model": entry.id, "query": request.query, "documents": texts}
    scores, tokens = await live_rows(state, CAPABILITY, payload, len(texts), disconnected)
    response_id = f"rerank-{uuid.uuid4().hex}"
    return orjson.dumps(rerank_body(response_id, request.model, request, texts, scores, tokens))
