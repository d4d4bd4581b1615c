"""The API's pages work offline: headless Chromium, with no network beyond loopback,
renders `/docs` (Swagger UI) and `/redoc` from laneway's own assets, and the rendered DOM
holds the operations, so their scripts really ran."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.browser import render
from tests.harness import Stack
from tests.integration.batch_support import fake_stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

OPERATIONS = ("/v1/embeddings", "/v1/batches", "/v1/files", "/health")
EXTERNAL = re.compile(r"https?://|//cdn\.|jsdelivr|unpkg|googleapis", re.IGNORECASE)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = fake_stack(tmp_path_factory.mktemp("pages-stack"), entries=[], env={})
    try:
        yield stack
    finally:
        stack.close()


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_pages_name_no_outside_url(stack: Stack, page: str) -> None:
    html = httpx.get(f"{stack.base_url}{page}", timeout=10).text
    assert not EXTERNAL.findall(html), html
    for asset in re.findall(r'(?:src|href)="([^"]+)"', html):
        assert asset.startswith("/docs/assets/"), asset
        response = httpx.get(f"{stack.base_url}{asset}", timeout=10)
        assert response.status_code == 200, asset
        assert len(response.content) > 1000, asset


def test_swagger_ui_renders_the_operations_offline(stack: Stack, tmp_path: Path) -> None:
    screenshot = tmp_path / "docs.png"
    dom = render(f"{stack.base_url}/docs", screenshot=screenshot)
    assert "swagger-ui" in dom
    blocks = re.findall(r'<div class="opblock opblock-(\w+)[^"]*" id="operations-[^"]+"', dom)
    assert len(blocks) >= 10, f"Swagger UI rendered {len(blocks)} operations:\n{dom[:3000]}"
    paths = set(re.findall(r'data-path="([^"]+)"', dom))
    for path in OPERATIONS:
        assert path in paths, f"{path} not rendered; got {sorted(paths)}"
    assert "post" in blocks and "get" in blocks
    # what Swagger UI shows when it cannot read the document or resolve a reference
    assert "Unable to render this definition" not in dom
    assert "Resolver error" not in dom
    png = screenshot.read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000, "a blank screenshot"


def test_redoc_renders_the_operations_offline(stack: Stack) -> None:
    dom = render(f"{stack.base_url}/redoc")
    assert "api-content" in dom or "redoc-wrap" in dom, dom[:3000]
    for path in OPERATIONS:
        assert path in dom, f"{path} not rendered by ReDoc"
    assert "Something went wrong" not in dom
