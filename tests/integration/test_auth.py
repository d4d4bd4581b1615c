"""The API key, against a real API process: checked from the headers before any byte of
the body is read, never a 500 whatever the credentials hold, and a setting for whether
the operator pages (/docs, /openapi.json, /metrics) need it too. /health never does."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import Stack
from tests.integration.batch_support import FAKE, fake_stack
from tests.integration.helpers import assert_openai_error

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

KEY = "sk-test-\u00e9-not-ascii"  # a key a user might really choose
GOOD = {"Authorization": b"Bearer " + KEY.encode("utf-8")}
OPS = ("/metrics", "/openapi.json", "/docs", "/redoc", "/docs/assets/swagger-ui-bundle.js")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = fake_stack(
        tmp_path_factory.mktemp("auth-stack"), entries=[], env={"LANEWAY_API_KEY": KEY}
    )
    try:
        yield stack
    finally:
        stack.close()


def embed(stack: Stack, headers: dict[str, bytes | str]) -> httpx.Response:
    return httpx.post(
        f"{stack.base_url}/v1/embeddings",
        json={"model": FAKE, "input": "hello"},
        headers=headers,
        timeout=30,
    )


def test_the_right_key_works(stack: Stack) -> None:
    assert embed(stack, GOOD).status_code == 200
    models = httpx.get(f"{stack.base_url}/v1/models", headers=GOOD, timeout=10)
    assert [m["id"] for m in models.json()["data"]] == [FAKE]


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        b"",
        b"Bearer",
        b"Basic dXNlcjpwYXNz",
        b"Bearer wrong",
        b"Bearer " + "sk-\u00e9\u00e8\u00ea".encode("latin-1"),
        b"Bearer " + "sk-\u65e5\u672c".encode(),
        b"Bearer \xff\xfe\xfd",
        b"Bearer " + KEY.encode("utf-8") + b"x",
        b"bearer " + b"k" * 4000,
    ],
    ids=repr,
)
def test_wrong_credentials_are_401(stack: Stack, authorization: bytes | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = embed(stack, headers)  # type: ignore[arg-type]
    assert_openai_error(response, 401, code="invalid_api_key")
    assert response.headers["www-authenticate"] == "Bearer"


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_an_unauthenticated_body_is_never_read(stack: Stack) -> None:
    """A 16 MB body without a key: the 401 comes back after the first 64 KB were sent,
    and the API's memory does not grow by the body's size."""
    assert stack.api is not None
    size = 16 * 1000 * 1000
    before = rss_kb(stack.api.pid)
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", stack.api_port or 0), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {size}\r\n\r\n".encode()
                + b"[" * 65536
            )
            started = time.monotonic()
            answer = sock.recv(4096)
            assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
            assert time.monotonic() - started < 5
    grown_kb = rss_kb(stack.api.pid) - before
    assert grown_kb < 8 * 1024, f"the API grew by {grown_kb} KB"
    assert embed(stack, GOOD).status_code == 200


def test_operator_pages_are_open_by_default(stack: Stack) -> None:
    for path in OPS:
        assert httpx.get(f"{stack.base_url}{path}", timeout=10).status_code == 200, path
    assert httpx.get(f"{stack.base_url}/health", timeout=10).status_code == 200
    schema = httpx.get(f"{stack.base_url}/openapi.json", timeout=10).json()
    assert schema["components"]["securitySchemes"] == {
        "bearer": {"type": "http", "scheme": "bearer"}
    }
    assert schema["paths"]["/v1/embeddings"]["post"]["security"] == [{"bearer": []}]
    assert "security" not in schema["paths"]["/health"]["get"]


def test_protect_ops_puts_them_behind_the_key(stack: Stack) -> None:
    stack.restart_api({"LANEWAY_PROTECT_OPS": "true"}, healthy=True)
    try:
        for path in OPS:
            response = httpx.get(f"{stack.base_url}{path}", timeout=10)
            assert_openai_error(response, 401)
            ok = httpx.get(f"{stack.base_url}{path}", headers=GOOD, timeout=10)
            assert ok.status_code == 200, path
        assert httpx.get(f"{stack.base_url}/health", timeout=10).status_code == 200
    finally:
        stack.restart_api({}, healthy=True)
