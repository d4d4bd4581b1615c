"""The one place exceptions become HTTP responses, always in OpenAI's error shape."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.metrics import ERRORS
from tasks.errors import LanewayError, QueueFull

log = logging.getLogger(__name__)

_HTTP_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


# union-typed fields give one pydantic error per member; say what is allowed instead
FIELD_HINTS = {
    "input": "Invalid value for 'input': expected a string, a list of strings, a list of "
    "token ids (integers) or a list of such lists.",
}


def error_body(message: str, type_: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: LanewayError, request: Request | None = None) -> JSONResponse:
    headers: dict[str, str] = {}
    if isinstance(exc, QueueFull):
        headers["Retry-After"] = str(exc.retry_after)
    route = request.url.path if request is not None else ""
    ERRORS.labels(route=route, code=str(exc.status_code)).inc()
    return JSONResponse(
        error_body(exc.message, exc.error_type, exc.param, exc.code),
        status_code=exc.status_code,
        headers=headers,
    )


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "Invalid request body", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "We could not parse the JSON body of your request: it is not valid JSON.", None
    # loc starts with where the value came from: body, query, path or header
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
    param = loc[0] if loc else None
    if first.get("type") == "missing":
        if param is None:  # no body at all
            return "The request body is empty; send a JSON object.", None
        return f"Missing required parameter: '{param}'.", param
    if param in FIELD_HINTS:
        return FIELD_HINTS[param], param
    where = f"'{'.'.join(loc)}'" if loc else "the body"
    return f"Invalid value for {where}: {first.get('msg', 'invalid')}", param


def install(app: FastAPI) -> None:
    @app.exception_handler(LanewayError)
    async def _laneway(request: Request, exc: LanewayError) -> JSONResponse:
        return error_response(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        ERRORS.labels(route=request.url.path, code="400").inc()
        return JSONResponse(
            error_body(message, "invalid_request_error", param, None), status_code=400
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        ERRORS.labels(route=request.url.path, code=str(exc.status_code)).inc()
        return JSONResponse(
            error_body(
                str(exc.detail), _HTTP_TYPES.get(exc.status_code, "server_error"), None, None
            ),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        ERRORS.labels(route=request.url.path, code="500").inc()
        return JSONResponse(
            error_body(
                "The server had an error while processing your request.", "server_error", None, None
            ),
            status_code=500,
        )
