"""The ASGI gate in front of every route: the API key and the key's rate limits (before
any byte of the body is read), the body-size limit (413) and the request metrics.

Order matters: an unauthenticated request is answered 401 from its headers alone, so a
stranger cannot make the API buffer a 16 MB body; a body over the limit is refused by its
``Content-Length`` or as it streams. The caller (``api.auth.Principal``) is left in
``scope["state"]["principal"]`` for the routes (whose files and batches) and the log.

Every decision is made on the path the router will route (``route_path``: the request's
path less ``root_path``), never on the raw one: behind a proxy that strips a prefix
(``laneway api --root-path /lw``), or mounted inside another app, ``/lw/v1/files`` is
routed to ``/v1/files`` and must be guarded as such. And it fails closed: every path
needs the key but ``/health`` and, unless ``LANEWAY_PROTECT_OPS``, the operator pages.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence

from starlette._utils import get_route_path
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.auth import KeyRing, Principal
from api.direct import DirectRoute
from api.errors import error_headers
from api.limits import METER, RateLimiter, TokenMeter
from api.metrics import ERRORS, REQUEST_LATENCY, UNMATCHED_ROUTE, model_label, route_label
from api.request_ids import HEADER, request_id_of
from api.responses import dumps
from api.state import AppState
from configs import tracing
from configs.logs import KEY_NAME, REQUEST_ID
from tasks.errors import LanewayError, PayloadTooLarge

ACCESS = logging.getLogger("laneway.access")

# what the API key leaves open: /health always, the operator pages unless a setting
# guards them too; everything else (every OpenAI route, and any path no route matches)
# needs it. Rate limits count the OpenAI routes.
V1_PREFIX = "/v1/"
PUBLIC_PATHS = ("/health",)
OPS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/metrics")
# the pages' scripts, styles and icon (api/docs.py): guarded exactly when the pages are
DOCS_ASSETS = "/docs/assets"


def route_path(scope: Scope) -> str:
    """The path the router matches: the request's path less the ``root_path`` a proxy
    (``--root-path``) or a mount set (Starlette's own rule, so the two never disagree)."""
    return get_route_path(scope)


def is_protected(path: str, *, protect_ops: bool) -> bool:
    """Whether the API key (when one is set) guards the routed ``path``."""
    if path in PUBLIC_PATHS:
        return False
    is_ops = path in OPS_PATHS or path == DOCS_ASSETS or path.startswith(f"{DOCS_ASSETS}/")
    return protect_ops or not is_ops


class _TooLarge(StarletteHTTPException):
    """An HTTPException, so FastAPI's body parsing re-raises it instead of making it a 400."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"Request body is larger than the limit of {limit} bytes")


class Gate:
    """Authentication, body limit and metrics for every HTTP request.

    Every body is held to ``max_bytes`` unless ``body_limits`` gives its path another
    (uploads: the files route, and later audio, declare theirs). A request for one of the ``direct``
    routes goes straight to it (with the process's ``state``) once past the key and the
    limits, instead of through FastAPI (see ``api/direct.py``)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: KeyRing,
        limiter: RateLimiter,
        protect_ops: bool,
        max_bytes: int,
        body_limits: Mapping[str, int] | None = None,
        served_models: Collection[str],
        routes: Callable[[], Iterable[BaseRoute]],
        direct: Sequence[DirectRoute] = (),
        state: Callable[[], AppState] | None = None,
    ) -> None:
        if direct and state is None:
            raise ValueError("direct routes need the state getter")
        self.app = app
        self.keys = keys
        self.limiter = limiter
        self.protect_ops = protect_ops
        self.max_bytes = max_bytes
        self.body_limits = dict(body_limits or {})
        self.served_models = frozenset(served_models)
        self.routes = routes
        self.direct = {(d.method, d.path): d for d in direct}
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        request_id = request_id_of(headers)
        scope.setdefault("state", {})["request_id"] = request_id
        token = REQUEST_ID.set(request_id)
        key_token = KEY_NAME.set(None)
        try:
            if tracing.TRACER is None:
                await self._serve(scope, receive, send, headers, started)
            else:
                await self._serve_traced(scope, receive, send, headers, started)
        finally:
            KEY_NAME.reset(key_token)
            REQUEST_ID.reset(token)

    async def _serve_traced(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: dict[bytes, bytes],
        started: float,
    ) -> None:
        """``_serve`` inside the request's server span: here, not in FastAPI, so that the
        direct routes (``api/direct.py``) and refusals get one too."""
        status = {"code": 500}

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        method = str(scope.get("method", ""))
        request_id = scope["state"]["request_id"]
        with tracing.server_span(method, route_path(scope), headers, request_id) as span:
            try:
                await self._serve(scope, receive, send_status, headers, started)
            finally:
                tracing.http_done(span, method, route_label(scope), status["code"])

    async def _serve(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: dict[bytes, bytes],
        started: float,
    ) -> None:
        path = route_path(scope)
        rid_header = (HEADER, scope["state"]["request_id"].encode("ascii"))
        limit = self.body_limits.get(path, self.max_bytes)
        length = headers.get(b"content-length")
        refusal = await self._admit(scope, path, headers)
        if refusal is None and length is not None and length.isdigit() and int(length) > limit:
            refusal = _too_large(limit)
        if refusal is not None:  # answered before routing: find the route it aimed at
            route = self._route_of(scope)
            await self._refuse(send, refusal, route, rid_header)
            self._observe(scope, refusal.status_code, started, route)
            return
        status = {"code": 500}
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
                message = {**message, "headers": [*message.get("headers", []), rid_header]}
            await send(message)

        direct = self.direct.get((scope["method"], path))
        principal = scope["state"].get("principal")
        meter = self._meter(principal)
        token = METER.set(meter)
        try:
            if direct is not None and self.state is not None:
                await direct(scope, limited_receive, send_wrapper, self.state())
            else:
                await self.app(scope, limited_receive, send_wrapper)
        except _TooLarge:
            status["code"] = 413
            await self._refuse(send, _too_large(limit), route_label(scope), rid_header)
        finally:
            METER.reset(token)
            await self._settle(principal, meter)
        # routed by now: the router set the route it matched (none: unmatched)
        self._observe(scope, status["code"], started, route_label(scope))

    def _meter(self, principal: Principal | None) -> TokenMeter:
        """The request's token meter: holds and charges for a key with a tokens limit."""
        if self.state is None or principal is None:  # no keys: nothing to hold or charge
            return TokenMeter()
        return self.limiter.meter(self.state().redis, principal)

    async def _settle(self, principal: Principal | None, meter: TokenMeter) -> None:
        if principal is not None and (meter.tokens or meter.held) and self.state is not None:
            await self.limiter.settle(self.state().redis, principal, meter)

    async def _admit(
        self, scope: Scope, path: str, headers: dict[bytes, bytes]
    ) -> LanewayError | None:
        """401 for a protected path without a valid key, 429 for a key over its limits:
        decided from headers alone. None: go on. A request the keys let through (a valid
        key, or no keys configured) is marked ``authenticated`` (``/health`` shows its
        detail only to such a caller)."""
        if not is_protected(path, protect_ops=self.protect_ops):
            with contextlib.suppress(LanewayError):  # open path: a bad key is no refusal
                await self._authenticate(scope, headers)
            return None
        try:
            principal = await self._authenticate(scope, headers)
            if principal is None:  # no keys configured
                return None
            KEY_NAME.set(principal.name)  # for the live message (the worker's log)
            if path.startswith(V1_PREFIX) and self.state is not None:
                await self.limiter.admit(self.state().redis, principal)
        except LanewayError as exc:
            return exc
        return None

    async def _authenticate(self, scope: Scope, headers: dict[bytes, bytes]) -> Principal | None:
        """The caller (None: no keys configured), left in the scope's state; raises
        ``LanewayError`` for a missing or bad key."""
        principal = await self.keys.authenticate(headers.get(b"authorization"))
        scope["state"]["authenticated"] = True
        if principal is not None:
            scope["state"]["principal"] = principal
        return principal

    def _route_of(self, scope: Scope) -> str:
        """The template of the route a request would reach (it has not been routed yet)."""
        for route in self.routes():
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return str(getattr(route, "path", UNMATCHED_ROUTE))
        return UNMATCHED_ROUTE

    async def _refuse(
        self, send: Send, exc: LanewayError, route: str, rid_header: tuple[bytes, bytes]
    ) -> None:
        ERRORS.labels(route=route, code=str(exc.status_code)).inc()
        body = dumps(exc.body())
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            rid_header,
            *((k.lower().encode(), v.encode()) for k, v in error_headers(exc).items()),
        ]
        await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _observe(self, scope: Scope, status: int, started: float, route: str) -> None:
        state = scope.get("state", {})
        model = model_label(state.get("model"), self.served_models)
        seconds = time.perf_counter() - started
        REQUEST_LATENCY.labels(route=route, model=model, status=str(status)).observe(seconds)
        if ACCESS.isEnabledFor(logging.INFO):  # JSON logs only (configs.logs)
            fields = {
                "method": scope.get("method"),
                "route": route,
                "model": model or None,
                "status": status,
                "latency_ms": round(seconds * 1000, 3),
            }
            principal: Principal | None = state.get("principal")
            if principal is not None:  # the key's name, never the key
                fields["key"] = principal.name
            ACCESS.info("request", extra={"fields": fields})


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"Request body is larger than the limit of {limit} bytes")
