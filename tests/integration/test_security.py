"""Issue 19's defects, each against real processes: an API behind a path prefix
(``--root-path``) that guards every route with static and database keys, /health's
detail behind the key, deeply nested JSON, idempotency keys that never cross owners,
batch jobs that break every time, over-long batch lines, per-key quotas, batch hints for a
lane nobody serves, and a key revoked while an API process was idle.

One stack serves them all: static keys for alice and bob, the single key whose owner is
None, database keys made with `laneway keys create`, and the API run with
``LANEWAY_ROOT_PATH=/lw`` as behind a proxy that strips that prefix.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tasks.queue.names import BATCH, queue_name
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

ANON_KEY = "sk-anon-0123456789"  # LANEWAY_API_KEY: its owner is None
ALICE, BOB = "sk-alice-0123456789", "sk-bob-0123456789"
SLOW = "test/slow-fake"
LINE_LIMIT = 65536
REFRESH_S = 0.5


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = {
        "LANEWAY_API_KEY": ANON_KEY,
        "LANEWAY_API_KEYS": f"alice:{ALICE},bob:{BOB}",
        "LANEWAY_KEYS_REFRESH_S": str(REFRESH_S),
        "LANEWAY_CHUNK_MAX_ATTEMPTS": "2",
        "LANEWAY_MAX_BATCH_LINE_BYTES": str(LINE_LIMIT),
        "LANEWAY_BATCH_POLL_S": "0.2",
    }
    stack = fake_stack(
        tmp_path_factory.mktemp("security"),
        entries=[fake_entry(SLOW, 0.3)],
        env=env,
        api_env={"LANEWAY_ROOT_PATH": "/lw"},
    )
    try:
        yield stack
    finally:
        stack.close()


def auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def get(stack: Stack, path: str, key: str | None = None) -> httpx.Response:
    return httpx.get(f"{stack.base_url}{path}", headers=auth(key), timeout=30)


def upload(
    stack: Stack,
    key: str | None,
    content: bytes,
    *,
    idem: str | None = None,
    purpose: str = "batch",
) -> httpx.Response:
    headers = auth(key) | ({"Idempotency-Key": idem} if idem else {})
    return httpx.post(
        f"{stack.base_url}/v1/files",
        headers=headers,
        files={"file": ("in.jsonl", content)},
        data={"purpose": purpose},
        timeout=30,
    )


def create_batch(
    stack: Stack, key: str, file_id: str, *, endpoint: str = "/v1/embeddings", idem: str = ""
) -> httpx.Response:
    headers = auth(key) | ({"Idempotency-Key": idem} if idem else {})
    return httpx.post(
        f"{stack.base_url}/v1/batches",
        headers=headers,
        json={"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h"},
        timeout=30,
    )


def client(stack: Stack, key: str) -> Any:
    return stack.openai_client(api_key=key, max_retries=0)


# -- the gate decides on the routed path -------------------------------------------------------


def test_behind_a_prefix_every_route_needs_the_key(stack: Stack) -> None:
    """uvicorn puts the root path in front of the path it received: the proxy's
    stripped request for /v1/files arrives as /lw/v1/files, and is routed to /v1/files."""
    stored = create_key(stack, "carol")
    wait_until(lambda: get(stack, "/v1/files", stored).status_code == 200, 10, "carol's key")
    guarded = ["/v1/files", "/v1/batches", "/v1/models", "/v1/files/file-abc/content"]
    for path in [*guarded, *(f"/lw{p}" for p in guarded), "/lw/nothing", "/nothing"]:
        assert_openai_error(get(stack, path), 401, code="invalid_api_key")
        assert_openai_error(get(stack, path, "sk-wrong"), 401, code="invalid_api_key")
    assert_openai_error(upload(stack, None, jsonl([request("a", "x")])), 401)
    for key, owner_sees in ((ALICE, "alice"), (stored, "carol")):
        listing = get(stack, "/v1/files", key)
        assert listing.status_code == 200, listing.text
        made = upload(stack, key, jsonl([request("a", owner_sees)]))
        assert made.status_code == 200, made.text
        assert made.json()["id"] in {f["id"] for f in get(stack, "/v1/files", key).json()["data"]}
    served = httpx.post(  # the direct route, found by the routed path
        f"{stack.base_url}/v1/embeddings",
        json={"model": FAKE, "input": "hello"},
        headers=auth(ALICE),
        timeout=30,
    )
    assert served.status_code == 200, served.text


def test_health_shows_its_workers_only_to_a_key(stack: Stack) -> None:
    anonymous = get(stack, "/health")
    assert anonymous.status_code == 200
    assert all(set(m) == {"warm"} for m in anonymous.json()["models"].values())
    detailed = get(stack, "/health", ALICE).json()["models"][FAKE]
    assert detailed["warm"] and detailed["workers"] and detailed["warm_workers"]
    assert detailed["engines"] == ["FakeEmbeddingBackend"]  # which engine serves it


# -- deeply nested JSON ---------------------------------------------------------------------------


def nested(depth: int, leaf: Any = "x") -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def raw_nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize("route", ["/v1/embeddings", "/v1/chat/completions", "/v1/batches"])
def test_deeply_nested_json_is_a_400_never_a_500(stack: Stack, route: str) -> None:
    bodies = [
        raw_nested(100_000),
        b'{"model": "%s", "input": %s}' % (FAKE.encode(), raw_nested(5000)),
        b'{"model": "%s", "input": "x", "extra": %s}' % (FAKE.encode(), raw_nested(1000)),
        json.dumps({"model": FAKE, "input": nested(300)}).encode(),
        json.dumps(
            {"model": FAKE, "messages": [{"role": "user", "content": nested(600)}]}
        ).encode(),
    ]
    for body in bodies:
        response = httpx.post(
            f"{stack.base_url}{route}",
            content=body,
            headers=auth(ALICE) | {"content-type": "application/json"},
            timeout=30,
        )
        assert response.status_code in (200, 400), (body[:60], response.text[:300])
        if response.status_code == 400:
            assert_openai_error(response, 400)
    assert httpx.get(f"{stack.base_url}/health", timeout=10).status_code == 200


# -- idempotency keys -----------------------------------------------------------------------------


def test_idempotency_keys_never_find_another_owners_object(stack: Stack) -> None:
    """The owner None's keys were stored as sent; it could send alice's stored form."""
    made = upload(stack, ALICE, jsonl([request("a", "alice's")]), idem="same")
    assert made.status_code == 200, made.text
    alices = made.json()["id"]
    stored_form = "owner:" + hashlib.sha256(b"alice\x00same").hexdigest()
    for key, idem in ((ANON_KEY, stored_form), (ANON_KEY, "same"), (BOB, "same")):
        other = upload(stack, key, jsonl([request("a", "theirs")]), idem=idem)
        assert other.status_code == 200, other.text
        assert other.json()["id"] != alices
        assert upload(stack, key, b"{}", idem=idem).json()["id"] == other.json()["id"]
    batch = create_batch(stack, ALICE, alices, idem="batch-key")
    assert batch.status_code == 200, batch.text
    anon_file = upload(stack, ANON_KEY, jsonl([request("a", "x")])).json()["id"]
    batch_stored_form = "owner:" + hashlib.sha256(b"alice\x00batch-key").hexdigest()
    stolen = create_batch(stack, ANON_KEY, anon_file, idem=batch_stored_form)
    assert stolen.status_code == 200 and stolen.json()["id"] != batch.json()["id"]
    for key, idem in ((ANON_KEY, "batch-key"), (BOB, "batch-key")):
        mine = upload(stack, key, jsonl([request("a", "x")])).json()["id"]
        theirs = create_batch(stack, key, mine, idem=idem)
        assert theirs.status_code == 200 and theirs.json()["id"] != batch.json()["id"]


# -- batch validation that cannot crash forever -----------------------------------------------


def submit_raw(stack: Stack, key: str, content: bytes) -> str:
    made = upload(stack, key, content)
    assert made.status_code == 200, made.text
    batch = create_batch(stack, key, made.json()["id"])
    assert batch.status_code == 200, batch.text
    return str(batch.json()["id"])


def test_a_line_nested_too_deeply_fails_the_batch_at_once(stack: Stack) -> None:
    line = b'{"custom_id": "deep", "method": "POST", "url": "/v1/embeddings", "body": '
    line += b'{"model": "%s", "input": %s}}' % (FAKE.encode(), raw_nested(5000))
    batch_id = submit_raw(stack, ALICE, jsonl([request("ok", "x"), line]))
    done = wait_finished(client(stack, ALICE), batch_id, timeout=60)
    assert done.status == "failed"
    [error] = done.errors.data
    assert (error.code, error.line) == ("invalid_json_line", 2)
    assert "nested too deeply" in error.message


def test_a_line_over_the_size_limit_fails_the_batch(stack: Stack) -> None:
    big = request("big", "y" * (LINE_LIMIT + 10))
    batch_id = submit_raw(stack, ALICE, jsonl([request("ok", "x"), big, request("after", "z")]))
    done = wait_finished(client(stack, ALICE), batch_id, timeout=60)
    assert done.status == "failed"
    [error] = done.errors.data
    assert (error.code, error.line) == ("line_too_large", 2)
    assert str(LINE_LIMIT) in error.message


def test_a_validation_that_breaks_every_time_fails_the_batch(stack: Stack) -> None:
    """The input's bytes vanished from the store: every validation raises. Each claim is
    counted in the database; past LANEWAY_CHUNK_MAX_ATTEMPTS (2 here) the batch fails."""
    made = upload(stack, ALICE, jsonl([request("a", "x")]))
    file_id = made.json()["id"]
    (stack.root / "files" / "files" / file_id).unlink()
    batch = create_batch(stack, ALICE, file_id)
    assert batch.status_code == 200, batch.text
    done = wait_finished(client(stack, ALICE), batch.json()["id"], timeout=60)
    assert done.status == "failed"
    [error] = done.errors.data
    assert error.code == "batch_job_failed"
    assert "2 times" in error.message


# -- quotas -------------------------------------------------------------------------------------


def test_storage_quotas_per_key(stack: Stack) -> None:
    key = create_key(stack, "q-files", "--max-files", "2", "--max-stored-bytes", "3000")
    wait_until(lambda: get(stack, "/v1/files", key).status_code == 200, 10, "the key")
    small = jsonl([request("a", "x")])
    first, second = upload(stack, key, small), upload(stack, key, small)
    assert first.status_code == second.status_code == 200
    third = assert_openai_error(upload(stack, key, small), 400, code="storage_quota_exceeded")
    assert "2 files" in third["message"]
    assert httpx.delete(
        f"{stack.base_url}/v1/files/{first.json()['id']}", headers=auth(key), timeout=30
    ).is_success
    too_big = upload(stack, key, b"x" * 2990)
    error = assert_openai_error(too_big, 400, code="storage_quota_exceeded")
    assert "3000 bytes" in error["message"]
    assert upload(stack, key, small).status_code == 200  # what fits still does
    listing = {k["name"]: k for k in json.loads(keys_cli(stack, "list", "--json").stdout)}
    assert listing["q-files"]["max_files"] == 2
    assert listing["q-files"]["max_stored_bytes"] == 3000


def test_batch_quotas_per_key(stack: Stack) -> None:
    key = create_key(stack, "q-batches", "--max-open-batches", "1", "--max-batch-lines", "3")
    wait_until(lambda: get(stack, "/v1/files", key).status_code == 200, 10, "the key")
    two = [request(f"r{i}", f"text {i}", model=SLOW) for i in range(2)]
    running = submit_raw(stack, key, jsonl(two))
    second = upload(stack, key, jsonl(two)).json()["id"]
    refused = assert_openai_error(
        create_batch(stack, key, second), 429, code="batch_quota_exceeded"
    )
    assert "1 open batches" in refused["message"]
    assert wait_finished(client(stack, key), running, timeout=60).status == "completed"
    five = [request(f"r{i}", f"text {i}", model=SLOW) for i in range(5)]
    over = wait_finished(client(stack, key), submit_raw(stack, key, jsonl(five)), timeout=60)
    assert over.status == "failed"
    [error] = over.errors.data
    assert error.code == "batch_lines_limit_exceeded" and "3" in error.message
    fits = wait_finished(client(stack, key), submit_raw(stack, key, jsonl(two)), timeout=60)
    assert fits.status == "completed"


# -- hints for a lane nobody serves ------------------------------------------------------------


def test_hints_for_a_lane_no_worker_consumes_do_not_pile_up(stack: Stack) -> None:
    """No speech model is served: nothing takes the audio batch lane's wake-up hints, and a
    ``noeviction`` Redis must not fill with them."""
    line = {
        "custom_id": "a",
        "method": "POST",
        "url": "/v1/audio/transcriptions",
        "body": {"model": "whisper-1", "file": "file-x"},
    }
    file_id = upload(stack, BOB, jsonl([line])).json()["id"]
    for _ in range(20):
        made = create_batch(stack, BOB, file_id, endpoint="/v1/audio/transcriptions")
        assert made.status_code == 200, made.text
    assert 1 <= stack.redis().llen(queue_name("audio", BATCH)) <= 8


# -- revocation ---------------------------------------------------------------------------------


def test_a_key_revoked_while_the_api_is_idle_is_refused_at_once(stack: Stack) -> None:
    key = create_key(stack, "idle")
    wait_until(lambda: get(stack, "/v1/files", key).status_code == 200, 10, "the key")
    keys_cli(stack, "revoke", "idle")
    time.sleep(REFRESH_S * 3)  # nobody calls this API meanwhile
    assert_openai_error(get(stack, "/v1/files", key), 401, code="key_revoked")
