"""OpenAI /v1/embeddings request and response models.

The request schema is the task contract too (Batch API lines are parsed with it in the
workers), so it lives in ``tasks/contracts/embeddings.py``; the API re-exports it here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from api.protocol import PromptUsage
from tasks.contracts.embeddings import EmbeddingRequest


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: PromptUsage


# the route reads its body itself (no pydantic model on the hot path): this documents it
REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": EmbeddingRequest.model_json_schema()}},
    }
}

__all__ = ["REQUEST_BODY", "EmbeddingData", "EmbeddingRequest", "EmbeddingResponse"]
