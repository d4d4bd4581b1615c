"""Keys and tenants with real processes: `laneway keys` against the stack's database while
the API runs, owners that cannot see each other's files and batches, revoked and expired
keys, malformed headers, and per-key rate limits shared by two API processes through
Redis."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.harness import Stack, wait_until
from tests.integration.batch_support import (
    FAKE,
    fake_entry,
    fake_stack,
    jsonl,
    request,
    wait_finished,
)
from tests.integration.helpers import assert_openai_error, create_key, keys_cli

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

WINDOW_S = 4.0  # the rate limits' window here (60 s in production)
SLOW, SLOW_FORWARD_S = "test/slow-fake", 1.5  # requests that stay in flight a while


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = {
        "LANEWAY_KEYS_REFRESH_S": "0.3",
        "LANEWAY_LOG_FORMAT": "json",
        "LANEWAY_RATE_LIMIT_WINDOW_S": str(WINDOW_S),
    }
    stack = fake_stack(
        tmp_path_factory.mktemp("keys"), entries=[fake_entry(SLOW, SLOW_FORWARD_S)], env=env
    )
    try:
        yield stack
    finally:
        stack.close()


def embed(base_url: str, key: str | None, text: str = "hello", model: str = FAKE) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(
        f"{base_url}/v1/embeddings",
        json={"model": model, "input": text},
        headers=headers,
        timeout=30,
    )


def client(stack: Stack, key: str) -> openai.OpenAI:
    return stack.openai_client(api_key=key, max_retries=0)


def until_status(stack: Stack, key: str | None, status: int) -> httpx.Response:
    """The API answers ``status`` for ``key`` within a few seconds (keys are re-read)."""
    return wait_until(  # type: ignore[no-any-return]
        lambda: (r := embed(stack.base_url, key)).status_code == status and r,
        timeout=10,
        what=f"the API to answer {status}",
    )


def test_a_key_made_while_the_api_runs_closes_it(stack: Stack) -> None:
    """No key anywhere: open. The first key made with `laneway keys create` closes every
    /v1 route within seconds, with no restart."""
    assert embed(stack.base_url, None).status_code == 200
    key = create_key(stack, "first")
    assert_openai_error(until_status(stack, None, 401), 401, code="invalid_api_key")
    assert embed(stack.base_url, key).status_code == 200
    assert httpx.get(f"{stack.base_url}/health", timeout=10).status_code == 200  # never guarded


@pytest.fixture(scope="module")
def keys(stack: Stack) -> dict[str, str]:
    made = {
        "alice": create_key(stack, "alice"),
        "bob": create_key(stack, "bob"),
        "alice-rotated": create_key(stack, "alice-rotated", "--owner", "alice"),
    }
    until_status(stack, made["bob"], 200)
    return made


def test_owners_do_not_see_each_others_files_and_batches(
    stack: Stack, keys: dict[str, str]
) -> None:
    alice, bob = client(stack, keys["alice"]), client(stack, keys["bob"])
    data = jsonl([request(f"r{i}", f"text {i}") for i in range(3)])
    upload = alice.files.create(file=("in.jsonl", data), purpose="batch")
    batch = alice.batches.create(
        input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h"
    )
    done = wait_finished(alice, batch.id)
    assert done.status == "completed" and done.output_file_id
    assert len(alice.files.content(done.output_file_id).content.splitlines()) == 3

    for file_id in (upload.id, done.output_file_id):
        with pytest.raises(openai.NotFoundError):
            bob.files.retrieve(file_id)
        with pytest.raises(openai.NotFoundError):
            bob.files.content(file_id)
        with pytest.raises(openai.NotFoundError):
            bob.files.delete(file_id)
    with pytest.raises(openai.NotFoundError):
        bob.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        bob.batches.cancel(batch.id)
    with pytest.raises(openai.NotFoundError) as named:  # a batch naming alice's file
        bob.batches.create(
            input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h"
        )
    assert named.value.body["param"] == "input_file_id"  # type: ignore[index]
    assert upload.id not in {f.id for f in bob.files.list()}
    assert batch.id not in {b.id for b in bob.batches.list()}
    with pytest.raises(openai.BadRequestError):  # nor can bob page "after" alice's id
        bob.files.list(after=upload.id)

    # alice still has all of it; a second key of the same owner sees the same
    rotated = client(stack, keys["alice-rotated"])
    assert rotated.batches.retrieve(batch.id).status == "completed"
    assert {upload.id, done.output_file_id} <= {f.id for f in rotated.files.list()}
    assert alice.files.delete(upload.id).deleted


def test_idempotency_keys_are_per_owner(stack: Stack, keys: dict[str, str]) -> None:
    """The same Idempotency-Key from two owners makes two files: it never returns the
    other owner's object."""
    made = {}
    for name in ("alice", "bob"):
        response = httpx.post(
            f"{stack.base_url}/v1/files",
            headers={"Authorization": f"Bearer {keys[name]}", "Idempotency-Key": "same-key"},
            files={"file": ("x.jsonl", jsonl([request("a", "x")]))},
            data={"purpose": "batch"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        made[name] = response.json()["id"]
    assert made["alice"] != made["bob"]


def test_revoked_and_expired_keys_are_401(stack: Stack, keys: dict[str, str]) -> None:
    temp = create_key(stack, "temp")
    short = create_key(stack, "short-lived", "--expires-in", "0.00003")  # 2.6 s
    until_status(stack, temp, 200)
    keys_cli(stack, "revoke", "temp")
    revoked = until_status(stack, temp, 401)
    assert_openai_error(revoked, 401, code="key_revoked")
    expired = until_status(stack, short, 401)
    assert_openai_error(expired, 401, code="key_expired")
    listing = {k["name"]: k for k in json.loads(keys_cli(stack, "list", "--json").stdout)}
    assert listing["temp"]["state"] == "revoked"
    assert listing["short-lived"]["state"] == "expired"
    assert "key_hash" not in listing["temp"]  # the hash never leaves the database
    assert embed(stack.base_url, keys["alice"]).status_code == 200  # others unaffected


def test_keys_cli_refuses_bad_input(stack: Stack) -> None:
    assert keys_cli(stack, "revoke", "nobody", check=False).returncode == 2
    bad = keys_cli(stack, "create", "--name", "bad name", check=False)
    assert bad.returncode == 2 and "name" in bad.stderr
    create_key(stack, "once")
    twice = keys_cli(stack, "create", "--name", "once", check=False)
    assert twice.returncode == 2 and "exists" in twice.stderr
    assert keys_cli(stack, "create", "--name", "x", "--expires-in", "-1", check=False).returncode


@pytest.mark.parametrize(
    "authorization",
    [
        b"",
        b"Bearer",
        b"Bearer    ",
        b"Basic dXNlcjpwYXNz",
        b"Token lw-abc",
        b"Bearer lw-a lw-b",
        b"Bearer " + b"k" * 10_000,
        b"Bearer \xff\xfe\xfdx",
        "Bearer lw-\u65e5\u672c".encode(),
    ],
    ids=repr,
)
def test_malformed_authorization_is_401(
    stack: Stack, keys: dict[str, str], authorization: bytes
) -> None:
    """Sent over a raw socket: HTTP clients refuse to send some of these at all."""
    status, headers, body = raw_post(stack.base_url, "/v1/embeddings", authorization)
    assert status == 401, body
    error = json.loads(body)["error"]
    assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
    assert headers["www-authenticate"] == "Bearer"
    assert b"k" * 100 not in body  # the value is never echoed


def raw_post(base_url: str, path: str, authorization: bytes) -> tuple[int, dict[str, str], bytes]:
    host, port = base_url.removeprefix("http://").split(":")
    body = json.dumps({"model": FAKE, "input": "x"}).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + b"Authorization: " + authorization + b"\r\n\r\n" + body)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head_bytes, _, payload = reply.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in fields.items()}, payload


def at_window_start(stack: Stack, *, quiet: bool = True, into: float = 0.05) -> None:
    """Sleep to ``into`` seconds after a rate-limit window begins (Redis's clock numbers
    them); with ``quiet``, a whole window after the one now, so that the requests made so
    far (finding the new key) are out of the sliding window."""
    seconds, micros = stack.redis().time()
    now = seconds + micros / 1e6
    time.sleep(WINDOW_S - now % WINDOW_S + into + (WINDOW_S if quiet else 0.0))


@pytest.fixture(scope="module")
def second_api(stack: Stack) -> str:
    """Another API process on the same Redis and database (the stack stops it)."""
    return stack.start_another_api("api-2")


def test_requests_per_minute_are_shared_by_two_api_processes(stack: Stack, second_api: str) -> None:
    key = create_key(stack, "limited", "--rpm", "4")
    until_status(stack, key, 200)
    wait_until(lambda: embed(second_api, key).status_code == 200, 10, "the second API")
    at_window_start(stack)
    urls = [stack.base_url, second_api] * 2
    assert [embed(url, key).status_code for url in urls] == [200] * 4
    refused = embed(second_api, key)
    assert_openai_error(refused, 429, code="rate_limit_exceeded")
    assert "requests" in refused.json()["error"]["message"]
    retry_after = int(refused.headers["retry-after"])
    assert 1 <= retry_after <= WINDOW_S
    assert embed(stack.base_url, key).status_code == 429  # the first process agrees
    time.sleep(retry_after)
    assert embed(stack.base_url, key).status_code == 200  # recovered


def test_the_window_slides_no_burst_across_its_boundary(stack: Stack) -> None:
    """A key that spent its limit late in one window gets (almost) nothing at the start of
    the next: fixed windows would have let it send its limit twice in a moment."""
    key = create_key(stack, "bursty", "--rpm", "4")
    until_status(stack, key, 200)
    at_window_start(stack, into=WINDOW_S / 4)
    assert [embed(stack.base_url, key).status_code for _ in range(4)] == [200] * 4
    at_window_start(stack, quiet=False)
    # the sliding minute still holds ~3.95 of the 4: one more fits, then none
    statuses = [embed(stack.base_url, key).status_code for _ in range(3)]
    assert statuses == [200, 429, 429]
    refused = embed(stack.base_url, key)
    retry_after = int(refused.headers["retry-after"])
    assert 1 <= retry_after <= 2  # until the earlier window's share has faded by one
    time.sleep(retry_after)
    assert embed(stack.base_url, key).status_code == 200


def test_tokens_per_minute_are_counted_from_usage(stack: Stack) -> None:
    """A request holds its estimate (200 characters: 50 tokens) and is charged its usage
    (the fake model counts words: over 100), so the key is then over its 60."""
    key = create_key(stack, "token-limited", "--tpm", "60")
    until_status(stack, key, 200)
    at_window_start(stack)
    first = embed(stack.base_url, key, "a " * 100)
    assert first.status_code == 200 and first.json()["usage"]["prompt_tokens"] > 60
    refused = embed(stack.base_url, key, "x")
    assert_openai_error(refused, 429, code="rate_limit_exceeded")
    assert "tokens" in refused.json()["error"]["message"]
    time.sleep(int(refused.headers["retry-after"]))
    assert embed(stack.base_url, key, "x").status_code == 200


def test_requests_in_flight_hold_their_tokens(stack: Stack) -> None:
    """Five requests sent at once, each holding 40 tokens of the key's 100: two fit, the
    other three are refused while those two run (charging only on answer let all five
    through). Their answers give back what they held but did not use."""
    key = create_key(stack, "holding", "--tpm", "100")
    until_status(stack, key, 200)
    at_window_start(stack)
    text = "x" * 160  # one word: holds 40 tokens, uses 1
    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(lambda _: embed(stack.base_url, key, text, SLOW), range(5)))
    assert sorted(a.status_code for a in answers) == [200, 200, 429, 429, 429]
    refused = next(a for a in answers if a.status_code == 429)
    assert_openai_error(refused, 429, code="rate_limit_exceeded")
    assert "tokens" in refused.json()["error"]["message"] and refused.headers["retry-after"]
    # both answered: they used 2 of the 80 they held, so two more fit at once
    assert embed(stack.base_url, key, text).status_code == 200
    assert embed(stack.base_url, key, text).status_code == 200


def test_a_request_larger_than_the_limit_is_refused_before_it_runs(stack: Stack) -> None:
    key = create_key(stack, "small-tpm", "--tpm", "100")
    until_status(stack, key, 200)
    refused = embed(stack.base_url, key, "x" * 404)  # 101 tokens by the estimate
    assert_openai_error(refused, 429, code="rate_limit_exceeded")
    message = refused.json()["error"]["message"]
    assert "Request too large" in message and "101" in message, message
    # nothing was charged: 95 more fit beside the few that finding the key used
    assert embed(stack.base_url, key, "x" * 380).status_code == 200


def test_logs_name_the_key_but_never_hold_it(stack: Stack, keys: dict[str, str]) -> None:
    """The API's access line and the worker's line for one request both name the key."""
    response = embed(stack.base_url, keys["bob"])
    rid = response.headers["x-request-id"]

    def line_of(process: str, marker: str) -> dict[str, Any] | None:
        for path in Path(stack.log_dir).glob(f"*{process}*.log"):
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith("{") and rid in line and marker in line:
                    return dict(json.loads(line))
        return None

    api = wait_until(lambda: line_of("api", '"route"'), timeout=10, what="the access line")
    assert api["key"] == "bob" and api["status"] == 200
    worker = wait_until(lambda: line_of("worker", "queue_wait_ms"), 10, "the worker's line")
    assert worker["key"] == "bob" and worker["model"] == FAKE
    for path in Path(stack.log_dir).glob("*.log"):
        text = path.read_text(errors="replace")
        assert not any(k in text for k in keys.values()), f"a key is in {path.name}"
