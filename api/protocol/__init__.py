"""Request and response models of the API, one module per capability and resource.
Shared here: the usage of a call that only reads tokens (``PromptUsage``), and the OpenAPI
request body of a route that parses its body itself (``request_body``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class PromptUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


def request_body(schema: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI's ``requestBody`` for a route that reads its body itself (no pydantic
    model on the hot path): ``schema`` documents it."""
    content = {"application/json": {"schema": schema.model_json_schema()}}
    return {"requestBody": {"required": True, "content": content}}
