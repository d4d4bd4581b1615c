"""The gate decides on the path the router routes, never the raw one: behind a proxy
that strips a prefix (``root_path``, as uvicorn sets it for ``--root-path``) and mounted
inside another app, with static and database keys.

In-process over ASGI (httpx's transport builds the scope as uvicorn does: ``path`` with
the root path in front); tests/integration/test_security.py shows the same against a real
``laneway api --root-path``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.types import ASGIApp

from api.auth import KeyRing
from api.limits import RateLimiter
from api.middleware import Gate
from configs.settings import Settings
from tasks.access.keys import KeyRecord, hash_key

STATIC, STORED = "sk-static", "lw-stored"
MAX_BYTES, UPLOAD_BYTES = 1024, 4096


def records() -> Mapping[str, KeyRecord]:
    return {hash_key(STORED): KeyRecord("db-key", "carol")}


def app_behind_gate() -> ASGIApp:
    app = FastAPI()

    @app.api_route("/v1/files", methods=["GET", "POST"])
    async def files(request: Request) -> dict[str, Any]:
        principal = request.scope["state"].get("principal")
        body = await request.body()
        return {"owner": principal.owner if principal else None, "bytes": len(body)}

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        return {"authenticated": bool(request.scope["state"].get("authenticated"))}

    settings = Settings(api_keys=f"alice:{STATIC}")
    return Gate(
        app,
        keys=KeyRing(settings, records),
        limiter=RateLimiter(settings),
        protect_ops=False,
        max_bytes=MAX_BYTES,
        body_limits={"/v1/files": UPLOAD_BYTES},
        served_models=[],
        routes=lambda: app.routes,
    )


def call(
    app: ASGIApp, method: str, path: str, key: str | None = None, *, root: str = "", body: int = 0
) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, root_path=root)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with httpx.AsyncClient(transport=transport, base_url="http://gate") as client:
            return await client.request(method, path, headers=headers, content=b"x" * body)

    return asyncio.run(go())


# (app, root path the client's URL carries)
SHAPES = {
    "root_path": lambda: (app_behind_gate(), "/lw"),
    "mount": lambda: (Starlette(routes=[Mount("/lw", app=app_behind_gate())]), ""),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_a_prefixed_path_needs_the_key(shape: str) -> None:
    app, root = SHAPES[shape]()
    for method in ("GET", "POST"):
        response = call(app, method, "/lw/v1/files", root=root)
        assert response.status_code == 401, (method, response.text)
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert call(app, "GET", "/lw/v1/files", "sk-wrong", root=root).status_code == 401


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("key", "owner"), [(STATIC, "alice"), (STORED, "carol")])
def test_static_and_database_keys_pass_under_the_prefix(shape: str, key: str, owner: str) -> None:
    app, root = SHAPES[shape]()
    response = call(app, "GET", "/lw/v1/files", key, root=root)
    assert response.status_code == 200, response.text
    assert response.json()["owner"] == owner


@pytest.mark.parametrize("shape", SHAPES)
def test_body_limits_follow_the_routed_path(shape: str) -> None:
    """The upload route's own limit applies under the prefix, the default elsewhere."""
    app, root = SHAPES[shape]()
    ok = call(app, "POST", "/lw/v1/files", STATIC, root=root, body=UPLOAD_BYTES)
    assert ok.status_code == 200 and ok.json()["bytes"] == UPLOAD_BYTES
    too_big = call(app, "POST", "/lw/v1/files", STATIC, root=root, body=UPLOAD_BYTES + 1)
    assert too_big.status_code == 413


@pytest.mark.parametrize("shape", SHAPES)
def test_health_is_open_and_says_whether_the_caller_is_authenticated(shape: str) -> None:
    app, root = SHAPES[shape]()
    assert call(app, "GET", "/lw/health", root=root).json() == {"authenticated": False}
    assert call(app, "GET", "/lw/health", "wrong", root=root).json() == {"authenticated": False}
    assert call(app, "GET", "/lw/health", STORED, root=root).json() == {"authenticated": True}


@pytest.mark.parametrize("path", ["/lw/nothing", "/nothing", "/lw", "/lw/v1/files/../x"])
def test_a_path_no_route_knows_needs_the_key_too(path: str) -> None:
    app, root = SHAPES["root_path"]()
    assert call(app, "GET", path, root=root).status_code == 401
