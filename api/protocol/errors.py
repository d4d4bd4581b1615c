"""The error body every route answers with (built by ``tasks.errors.error_body``)."""

from __future__ import annotations

from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


DESCRIPTIONS = {
    400: "Bad request: the message names the parameter",
    401: "Missing or wrong API key",
    404: "Unknown model, file or batch",
    413: "Body larger than the limit",
    429: "Live queue full, or the key is over its requests or tokens per minute; retry "
    "after Retry-After seconds",
    500: "Internal error: the message carries a request id",
    503: "The model is not warm or no worker serves it; on batch and file routes, the "
    "database is unavailable (code database_unavailable; retry after Retry-After seconds)",
    504: "No result within LANEWAY_REQUEST_TIMEOUT_S",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, object]]:
    """The ``responses=`` of a route: each status it can answer with OpenAI's error body."""
    return {
        code: {"model": ErrorResponse, "description": DESCRIPTIONS[code]}
        for code in sorted({*codes, 500})
    }
