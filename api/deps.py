"""FastAPI dependencies, as ``Annotated`` aliases the routes declare.

All are ``async def``: FastAPI runs plain functions in a thread pool, a hop per request.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import Depends, Request

from api.state import AppState
from configs.settings import Settings
from tasks.errors import AuthenticationFailed


async def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.laneway
    return state


async def get_settings_dep(state: Annotated[AppState, Depends(get_state)]) -> Settings:
    return state.settings


async def require_api_key(request: Request, state: Annotated[AppState, Depends(get_state)]) -> None:
    expected = state.settings.api_key
    if not expected:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), expected):
        raise AuthenticationFailed("Incorrect API key provided.")


async def wait_disconnect(request: Request) -> Any:
    """Resolves when the client hangs up (the body has been read by then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return message


StateDep = Annotated[AppState, Depends(get_state)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
