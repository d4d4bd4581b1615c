"""Hot routes answered straight from the gate, past FastAPI's request machinery.

A live call's own work in the API (parse, check, enqueue, wait, splice the reply) costs
less CPU than FastAPI's routing, dependency solving, request wrappers and exception
middleware around it: profiled under load on the fake backend, those took half of the
API process's busy time. A ``DirectRoute`` runs the same handler the FastAPI route runs
(the route stays, so OpenAPI documents it and any other method reaches it), with the
body read straight off ASGI and errors answered through ``api.errors.error_response``,
the one place exceptions become HTTP.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive, Scope, Send

from api.deps import until_disconnect
from api.errors import error_response
from api.state import AppState
from tasks.errors import ClientGone, InternalError, LanewayError

log = logging.getLogger(__name__)

Disconnected = Callable[[], Awaitable[Any]]
# (the process's state, the raw body, what resolves when the caller hangs up, the
# request's scope state for metrics labels) -> the JSON response body
Handler = Callable[[AppState, bytes, Disconnected, dict[str, Any]], Awaitable[bytes]]


@dataclass(frozen=True)
class _RouteLabel:
    """What ``api.metrics.route_label`` reads off ``scope["route"]``."""

    path: str


class DirectRoute:
    """``handler`` for one method and path, as an ASGI app the gate calls directly."""

    def __init__(self, method: str, path: str, handler: Handler) -> None:
        self.method = method
        self.path = path
        self.handler = handler
        self.label = _RouteLabel(path)

    async def __call__(self, scope: Scope, receive: Receive, send: Send, state: AppState) -> None:
        scope["route"] = self.label
        scope_state: dict[str, Any] = scope.setdefault("state", {})
        try:  # a body over the limit raises out of receive, for the gate to answer (413)
            raw = await Request(scope, receive).body()
        except ClientDisconnect:
            log.info("client hung up during %s %s", self.method, self.path)
            await self._error(scope, receive, send, ClientGone("client closed the request"))
            return
        try:
            body = await self.handler(state, raw, partial(until_disconnect, receive), scope_state)
        except LanewayError as exc:
            await self._error(scope, receive, send, exc)
            return
        except Exception:
            log.exception("unhandled error on %s %s", self.method, self.path)
            await self._error(scope, receive, send, InternalError.for_request(None))
            return
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _error(self, scope: Scope, receive: Receive, send: Send, exc: LanewayError) -> None:
        response = error_response(exc, route=self.path)
        await response(scope, receive, send)
