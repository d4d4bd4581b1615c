"""The one place exceptions become HTTP responses, always in OpenAI's error shape."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from api.metrics import ERRORS, route_label
from api.responses import json_response
from tasks.errors import (
    AuthenticationFailed,
    ClientGone,
    DatabaseUnavailable,
    InternalError,
    LanewayError,
    QueueFull,
    error_body,
    invalid_request,
    unsourced,
)
from tasks.store.db import database_unavailable, describe_unavailable

log = logging.getLogger(__name__)

_HTTP_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def error_headers(exc: LanewayError) -> dict[str, str]:
    """The headers an error is answered with besides its body (the gate's too)."""
    if isinstance(exc, QueueFull | DatabaseUnavailable):  # a full queue, a key over
        return {"Retry-After": str(exc.retry_after)}  # its limits, the database away
    if isinstance(exc, AuthenticationFailed):
        return {"WWW-Authenticate": "Bearer"}
    return {}


def error_response(
    exc: LanewayError, request: Request | None = None, *, route: str | None = None
) -> Response:
    """``exc`` in OpenAI's shape, counted under the request's route (or ``route``)."""
    headers = error_headers(exc)
    if request is not None:
        route = route_label(request.scope)
    if route is not None:
        ERRORS.labels(route=route, code=str(exc.status_code)).inc()
    return json_response(exc.body(), status_code=exc.status_code, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(LanewayError)
    async def _laneway(request: Request, exc: LanewayError) -> Response:
        return error_response(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        return error_response(invalid_request(unsourced(exc.errors())), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        ERRORS.labels(route=route_label(request.scope), code=str(exc.status_code)).inc()
        return json_response(
            error_body(str(exc.detail), _HTTP_TYPES.get(exc.status_code, "server_error")),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect) -> Response:
        # the caller hung up while sending its body (an upload cut short): nobody reads
        # this answer, but it is counted as 499, not as a server error
        log.info("client hung up during %s %s", request.method, route_label(request.scope))
        return error_response(ClientGone("client closed the request"), request)

    @app.exception_handler(SQLAlchemyError)
    async def _database(request: Request, exc: SQLAlchemyError) -> Response:
        # the database down or restarting (batch and file routes need it): a 503 that
        # says so, within the connect timeout (tasks/store/db.py), never a 500
        if not database_unavailable(exc):
            return await _unexpected(request, exc)
        route = route_label(request.scope)
        log.warning(
            "database unavailable on %s %s: %s", request.method, route, describe_unavailable(exc)
        )
        return error_response(DatabaseUnavailable(), request)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, route_label(request.scope))
        return error_response(InternalError.for_request(None), request)
