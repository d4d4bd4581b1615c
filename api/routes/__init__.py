"""The API's routers, one module per capability and per resource. Shared here:
``one_shot``, the FastAPI route and the direct route (``api/direct.py``) of a ``POST``
whose answer is one JSON body, made from the capability's parse and serve functions."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel

from api.deps import StateDep, wait_disconnect
from api.direct import DirectRoute, Disconnected, Handler
from api.protocol.errors import error_responses
from api.state import AppState


def one_shot(
    path: str,
    parse: Callable[[bytes], Any],
    serve: Callable[[Any, AppState, Disconnected], Awaitable[bytes]],
    *,
    name: str,
    response: type[BaseModel],
    request_body: dict[str, Any],
) -> tuple[APIRouter, DirectRoute]:
    """The FastAPI router and the direct route of ``POST path``: ``parse`` the body, name
    its model for the metrics' label, ``serve`` it."""

    async def create(
        state: AppState, raw: bytes, disconnected: Disconnected, scope_state: dict[str, Any]
    ) -> bytes:
        request = parse(raw)
        scope_state["model"] = request.model
        return await serve(request, state, disconnected)

    async def endpoint(request: Request, state: StateDep) -> Response:
        return await answer(create, request, state)

    router = APIRouter()
    router.add_api_route(
        path,
        endpoint,
        methods=["POST"],
        name=name,
        response_model=None,
        responses={200: {"model": response}, **error_responses(400, 401, 404, 413, 429, 503, 504)},
        openapi_extra=request_body,
    )
    return router, DirectRoute("POST", path, create)


async def answer(create: Handler, request: Request, state: AppState) -> Response:
    """A FastAPI route's answer through the handler its direct route runs."""
    scope_state = request.scope.setdefault("state", {})
    body = await create(state, await request.body(), lambda: wait_disconnect(request), scope_state)
    return Response(body, media_type="application/json")
