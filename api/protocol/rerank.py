"""/v1/rerank request and response models (vLLM's and Jina's shape).

The request schema is the task contract too (Batch API lines are parsed with it in the
workers), so it lives in ``tasks/contracts/rerank.py``; the API re-exports it here.
"""

from __future__ import annotations

from pydantic import BaseModel

from api.protocol import PromptUsage, request_body
from tasks.contracts.rerank import RerankRequest


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    # the document's text, with ``return_documents`` (the default)
    document: RerankDocument | None = None


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResult]
    usage: PromptUsage


REQUEST_BODY = request_body(RerankRequest)

__all__ = [
    "REQUEST_BODY",
    "RerankDocument",
    "RerankRequest",
    "RerankResponse",
    "RerankResult",
]
