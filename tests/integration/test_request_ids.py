"""Request ids end to end: the caller's X-Request-ID (or one made) comes back in the
response header, and the same id is on the API's and the worker's JSON log lines; an id
that is not safe to repeat is replaced, never echoed."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import Stack
from tests.integration.batch_support import (
    FAKE,
    fake_stack,
    read_lines,
    request,
    submit,
    wait_finished,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = fake_stack(
        tmp_path_factory.mktemp("request-ids"), entries=[], env={"LANEWAY_LOG_FORMAT": "json"}
    )
    try:
        yield stack
    finally:
        stack.close()


def json_lines(stack: Stack, name: str) -> list[dict[str, Any]]:
    out = []
    for path in sorted(Path(stack.log_dir).glob(f"*{name}*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
    return out


def wait_for_line(stack: Stack, name: str, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = [x for x in json_lines(stack, name) if x.get("request_id") == request_id]
        if found:
            return found[-1]
        time.sleep(0.2)
    raise AssertionError(f"no {name} log line with request_id {request_id!r}")


def embed(http: httpx.Client, **headers: str) -> httpx.Response:
    return http.post("/v1/embeddings", json={"model": FAKE, "input": "hi"}, headers=headers)


def test_one_id_in_the_header_the_api_log_and_the_worker_log(
    http: httpx.Client, stack: Stack
) -> None:
    response = embed(http, **{"X-Request-ID": "trace-42.a_b"})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "trace-42.a_b"
    api = wait_for_line(stack, "api", "trace-42.a_b")
    assert api["route"] == "/v1/embeddings" and api["status"] == 200
    assert api["model"] == FAKE and api["latency_ms"] > 0
    worker = wait_for_line(stack, "worker", "trace-42.a_b")
    assert worker["msg"] == "live request" and worker["status"] == "ok"
    assert worker["model"] == FAKE and worker["queue_wait_ms"] >= 0


def test_an_id_is_made_when_none_is_sent(http: httpx.Client, stack: Stack) -> None:
    response = embed(http)
    made = response.headers["x-request-id"]
    assert made.startswith("req_")
    assert wait_for_line(stack, "worker", made)["status"] == "ok"


def test_errors_carry_an_id_too(http: httpx.Client) -> None:
    missing = http.post("/v1/embeddings", json={"model": "no/such", "input": "x"})
    assert missing.status_code == 404 and missing.headers["x-request-id"].startswith("req_")
    too_big = http.post("/v1/embeddings", content=b"x" * (20 * 1024 * 1024))
    assert too_big.status_code == 413 and too_big.headers["x-request-id"].startswith("req_")


def test_a_10kb_id_is_replaced(http: httpx.Client) -> None:
    response = embed(http, **{"X-Request-ID": "a" * 10_240})
    assert response.status_code == 200
    assert response.headers["x-request-id"].startswith("req_")


def test_control_characters_are_not_echoed(stack: Stack) -> None:
    """Sent raw: a client library would refuse to send such a header."""
    host, port = stack.base_url.removeprefix("http://").split(":")
    body = json.dumps({"model": FAKE, "input": "hi"}).encode()
    request = (
        b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"X-Request-ID: evil\x01id\x7f\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
    )
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head = answer.split(b"\r\n\r\n", 1)[0]
    assert b"evil" not in head  # refused by the HTTP parser, or answered with a new id
    if head.startswith(b"HTTP/1.1 200"):
        assert b"x-request-id: req_" in head.lower()


def test_a_batch_lines_request_id_is_in_the_worker_log(client: Any, stack: Stack) -> None:
    lines = [request(f"r{i}", f"text {i}") for i in range(3)]
    batch = submit(client, lines)
    done = wait_finished(client, batch.id)
    assert done.status == "completed"
    out = read_lines(client, done.output_file_id)
    request_id = out[0]["response"]["request_id"]
    line = wait_for_line(stack, "worker", request_id)
    assert line["msg"] == "batch request" and line["batch_id"] == batch.id
    assert line["status"] == 200
