"""FastAPI dependencies, as ``Annotated`` aliases the routes declare.

All are ``async def``: FastAPI runs plain functions in a thread pool, a hop per request.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from starlette.types import Receive

from api.auth import Principal
from api.state import AppState
from configs.settings import Settings
from tasks.access.quotas import Quota
from tasks.access.tenancy import Owner


async def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.laneway
    return state


async def get_settings_dep(state: Annotated[AppState, Depends(get_state)]) -> Settings:
    return state.settings


async def get_owner(request: Request) -> Owner:
    """Whose files and batches the request may see: its key's owner (the gate
    authenticated it); None with no keys configured."""
    principal: Principal | None = request.scope.get("state", {}).get("principal")
    return principal.owner if principal is not None else None


async def get_quota(
    request: Request, settings: Annotated[Settings, Depends(get_settings_dep)]
) -> Quota:
    """What the request's key may keep and run (tasks/access/quotas.py): the settings' quotas,
    with the key's own overrides."""
    principal: Principal | None = request.scope.get("state", {}).get("principal")
    return Quota.of(settings, principal.quota if principal is not None else None)


async def until_disconnect(receive: Receive) -> Any:
    """Resolves when the client hangs up (the body has been read by then)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return message


async def wait_disconnect(request: Request) -> Any:
    return await until_disconnect(request.receive)


StateDep = Annotated[AppState, Depends(get_state)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
OwnerDep = Annotated[Owner, Depends(get_owner)]
QuotaDep = Annotated[Quota, Depends(get_quota)]
