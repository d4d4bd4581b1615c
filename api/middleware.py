"""ASGI middleware: body-size limit (413) and request latency metrics."""

from __future__ import annotations

import json
import time
from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_body
from api.metrics import ERRORS, REQUEST_LATENCY


class _TooLarge(StarletteHTTPException):
    """An HTTPException, so FastAPI's body parsing re-raises it instead of making it a 400."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"Request body is larger than the limit of {limit} bytes")


class BodyLimitAndMetrics:
    """Refuses bodies over the limit (by header or as they stream) and times each request.

    Uploads to /v1/files get their own, larger limit.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int, max_file_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_file_bytes = max_file_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        # multipart framing on top of the file itself
        limit = self.max_file_bytes + 1024 * 1024 if path == "/v1/files" else self.max_bytes
        started = time.perf_counter()
        status = {"code": 500}
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await self._refuse(send, limit, path)
            self._observe(scope, 413, started)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge(limit)
            return message

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, limited_receive, send_wrapper)
        except _TooLarge:
            await self._refuse(send, limit, path)
            status["code"] = 413
        self._observe(scope, status["code"], started)

    async def _refuse(self, send: Send, limit: int, path: str) -> None:
        ERRORS.labels(route=path, code="413").inc()
        body = json.dumps(
            error_body(
                f"Request body is larger than the limit of {limit} bytes",
                "invalid_request_error",
                None,
                "request_too_large",
            )
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def _observe(self, scope: Scope, status: int, started: float) -> None:
        route: Any = scope.get("route")
        path = getattr(route, "path", None) or "unmatched"
        model = scope.get("state", {}).get("model", "")
        REQUEST_LATENCY.labels(route=path, model=model, status=str(status)).observe(
            time.perf_counter() - started
        )
