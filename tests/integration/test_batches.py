"""/v1/batches on a real stack with fake models (one of them slow, so a batch is still
running when the test cancels it or its window ends): the flow, idempotency, metadata,
pagination, cancel, expiry, and every bad request or bad input file.

Output equality with the live endpoint on the real MiniLM is in tests/e2e/test_batch_up.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.harness import Stack
from tests.integration.batch_support import (
    ENDPOINT,
    FAKE,
    assert_exactly_once,
    assert_input_order,
    jsonl,
    request,
    requests,
    results,
    slow_fake_stack,
    submit,
    wait_finished,
    wait_running,
)
from tests.integration.helpers import assert_openai_error

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SLOW = "test/slow-fake"  # 0.3 s a forward pass: a 600-line batch runs a few seconds
SLOWER = "test/slower-fake"  # 1 s a forward pass: outlives a 3 s completion window
MAX_LINES = 1000
MAX_FILE_BYTES = 400_000
EXPIRY_WINDOW_S = 3


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = slow_fake_stack(
        tmp_path_factory.mktemp("batches-stack"),
        env={
            "LANEWAY_CHUNK_LINES": "20",
            "LANEWAY_REAPER_INTERVAL_S": "1",
            "LANEWAY_MAX_BATCH_LINES": str(MAX_LINES),
            "LANEWAY_MAX_FILE_BYTES": str(MAX_FILE_BYTES),
        },
        delays={SLOW: 0.3, SLOWER: 1.0},
    )
    try:
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="module")
def input_file(client: Any) -> str:
    return str(client.files.create(file=("in.jsonl", jsonl(requests(3))), purpose="batch").id)


# -- a batch from start to end -----------------------------------------------------------------


def test_batch_runs_to_completion(client: Any, http: httpx.Client) -> None:
    lines = requests(45, fail_every=10)  # r9, r19, ... have an empty input: 400 each
    ids = [x["custom_id"] for x in lines]
    metadata = {f"key{i}": f"value {i} ✓" for i in range(16)}
    created = submit(client, lines, metadata=metadata)
    assert created.status == "validating"
    assert created.object == "batch" and created.id.startswith("batch_")
    assert created.endpoint == ENDPOINT and created.completion_window == "24h"
    assert created.expires_at == created.created_at + 24 * 3600
    assert created.metadata == metadata

    batch = wait_finished(client, created.id)
    assert batch.status == "completed", batch
    assert batch.errors is None
    assert (batch.request_counts.total, batch.request_counts.completed) == (45, 41)
    assert batch.request_counts.failed == 4
    assert batch.created_at <= batch.in_progress_at <= batch.finalizing_at <= batch.completed_at
    assert batch.failed_at is None and batch.cancelled_at is None and batch.expired_at is None
    assert batch.metadata == metadata
    assert batch.model == FAKE

    output, errors = results(client, batch)
    assert_exactly_once(ids, output, errors)
    assert_input_order(ids, output)
    assert_input_order(ids, errors)
    assert [e["custom_id"] for e in errors] == ["r9", "r19", "r29", "r39"]
    tokens = 0
    for entry in output:
        assert set(entry) == {"id", "custom_id", "response", "error"}
        assert entry["id"].startswith("batch_req_") and entry["error"] is None
        response = entry["response"]
        assert response["status_code"] == 200 and response["request_id"]
        body = response["body"]
        assert body["object"] == "list" and body["model"] == FAKE
        assert len(body["data"]) == 1 and len(body["data"][0]["embedding"]) == 32
        tokens += body["usage"]["prompt_tokens"]
    for entry in errors:
        assert entry["response"]["status_code"] == 400
        error = entry["response"]["body"]["error"]
        assert set(error) == {"message", "type", "param", "code"}
    assert batch.usage.input_tokens == tokens > 0
    assert batch.usage.total_tokens == tokens and batch.usage.output_tokens == 0

    for file_id, name in ((batch.output_file_id, "output"), (batch.error_file_id, "error")):
        info = client.files.retrieve(file_id)
        assert info.purpose == "batch_output"
        assert info.filename == f"{batch.id}_{name}.jsonl"
        assert info.bytes == len(client.files.content(file_id).content)
    raw = http.get(f"/v1/batches/{batch.id}").json()
    for key in (
        "id",
        "object",
        "endpoint",
        "errors",
        "input_file_id",
        "completion_window",
        "status",
        "output_file_id",
        "error_file_id",
        "created_at",
        "in_progress_at",
        "expires_at",
        "finalizing_at",
        "completed_at",
        "failed_at",
        "expired_at",
        "cancelling_at",
        "cancelled_at",
        "request_counts",
        "metadata",
        "usage",
    ):
        assert key in raw, key


def test_an_input_over_the_token_limit_fails_alone(client: Any) -> None:
    lines = [request("short", "fine"), request("long", "word " * 300), request("end", "ok")]
    batch = wait_finished(client, submit(client, lines).id)
    assert batch.status == "completed"
    assert (batch.request_counts.completed, batch.request_counts.failed) == (2, 1)
    output, errors = results(client, batch)
    assert [x["custom_id"] for x in output] == ["short", "end"]
    (error,) = errors
    assert error["custom_id"] == "long"
    assert error["response"]["status_code"] == 400
    assert error["response"]["body"]["error"]["code"] == "context_length_exceeded"


def test_a_batch_where_every_request_fails_is_completed(client: Any) -> None:
    lines = [request(f"bad{i}", "") for i in range(5)]
    batch = wait_finished(client, submit(client, lines).id)
    assert batch.status == "completed"
    assert batch.output_file_id is None
    assert (batch.request_counts.total, batch.request_counts.failed) == (5, 5)
    output, errors = results(client, batch)
    assert output == [] and len(errors) == 5
    assert_exactly_once([x["custom_id"] for x in lines], output, errors)


def test_request_bodies_are_checked_like_the_live_route(client: Any) -> None:
    lines = [
        request("list", ["one", "two"]),
        request("tokens", [[5, 6, 7]]),
        request("b64", "x", encoding_format="base64"),
        request("dims", "x", dimensions=16),
        request("bad-dims", "x", dimensions=5),
        request("bad-format", "x", encoding_format="hex"),
        request("no-input", None),
    ]
    batch = wait_finished(client, submit(client, lines).id)
    assert batch.status == "completed"
    output, errors = results(client, batch)
    ok = {x["custom_id"]: x["response"]["body"] for x in output}
    assert set(ok) == {"list", "tokens", "b64", "dims"}
    assert len(ok["list"]["data"]) == 2
    assert isinstance(ok["b64"]["data"][0]["embedding"], str)
    assert len(ok["dims"]["data"][0]["embedding"]) == 16
    assert {x["custom_id"] for x in errors} == {"bad-dims", "bad-format", "no-input"}
    assert all(x["response"]["status_code"] == 400 for x in errors)


def test_idempotency_key_on_create(client: Any, input_file: str, http: httpx.Client) -> None:
    key = {"Idempotency-Key": f"create-{id(client)}-{input_file}"}
    args = {"input_file_id": input_file, "endpoint": ENDPOINT, "completion_window": "24h"}
    first = client.batches.create(**args, extra_headers=key)
    retry = client.batches.create(**args, extra_headers=key, metadata={"changed": "yes"})
    assert retry.id == first.id and retry.metadata is None
    raw = http.post("/v1/batches", json=args, headers=key)
    assert raw.status_code == 200 and raw.json()["id"] == first.id
    other = client.batches.create(
        **args, extra_headers={"Idempotency-Key": key["Idempotency-Key"] + "x"}
    )
    assert other.id != first.id
    listed = [b.id for b in client.batches.list(limit=100)]
    assert listed.count(first.id) == 1 and other.id in listed
    for batch_id in (first.id, other.id):
        assert wait_finished(client, batch_id).status == "completed"


def test_metadata_round_trip(client: Any, input_file: str) -> None:
    metadata = {"project": "laneway", "empty": "", "long": "v" * 512, "k" * 64: "x"}
    made = client.batches.create(
        input_file_id=input_file, endpoint=ENDPOINT, completion_window="24h", metadata=metadata
    )
    assert made.metadata == metadata
    assert client.batches.retrieve(made.id).metadata == metadata
    assert wait_finished(client, made.id).metadata == metadata


def test_batch_pagination(client: Any, http: httpx.Client, input_file: str) -> None:
    made = [
        client.batches.create(input_file_id=input_file, endpoint=ENDPOINT, completion_window="24h")
        for _ in range(5)
    ]
    everything = http.get("/v1/batches", params={"limit": 100}).json()
    assert everything["has_more"] is False
    ids = [b["id"] for b in everything["data"]]
    assert {b.id for b in made} <= set(ids) and len(ids) == len(set(ids))
    keys = [(b["created_at"], b["id"]) for b in everything["data"]]
    assert keys == sorted(keys, reverse=True)

    walked: list[str] = []
    after = None
    for _ in range(len(ids) + 2):
        page = http.get("/v1/batches", params={"limit": 2, **({"after": after} if after else {})})
        body = page.json()
        assert 1 <= len(body["data"]) <= 2
        assert body["first_id"] == body["data"][0]["id"]
        assert body["last_id"] == body["data"][-1]["id"]
        walked += [b["id"] for b in body["data"]]
        if not body["has_more"]:
            break
        after = body["last_id"]
    assert walked == ids
    assert [b.id for b in client.batches.list(limit=2)] == ids  # auto-pagination stops
    assert [b.id for b in client.batches.list(limit=1)] == ids
    default = http.get("/v1/batches").json()
    assert [b["id"] for b in default["data"]] == ids[:20]
    assert default["has_more"] is (len(ids) > 20)
    for batch in made:
        wait_finished(client, batch.id)


def test_output_expires_after(client: Any) -> None:
    batch = submit(
        client,
        requests(3, fail_every=3),
        output_expires_after={"anchor": "created_at", "seconds": 7200},
    )
    batch = wait_finished(client, batch.id)
    assert batch.status == "completed"
    for file_id in (batch.output_file_id, batch.error_file_id):
        info = client.files.retrieve(file_id)
        assert info.expires_at == info.created_at + 7200


def test_deleting_the_input_file_of_a_running_batch(client: Any, stack: Stack) -> None:
    """The file is gone for the API at once; the batch still reads it to the end."""
    lines = requests(300, model=SLOW)
    batch = submit(client, lines)
    wait_running(client, batch.id)
    deleted = client.files.delete(batch.input_file_id)
    assert deleted.deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(batch.input_file_id)
    batch = wait_finished(client, batch.id)
    assert batch.status == "completed", batch
    output, errors = results(client, batch)
    assert_exactly_once([x["custom_id"] for x in lines], output, errors)
    content = stack.root / "files" / "files" / batch.input_file_id
    deadline = time.monotonic() + 30  # the reaper removes it now that the batch is over
    while content.exists():
        assert time.monotonic() < deadline, "the deleted input's content was never removed"
        time.sleep(0.2)


# -- bad requests --------------------------------------------------------------------------------


def test_unknown_input_file(http: httpx.Client) -> None:
    response = http.post(
        "/v1/batches",
        json={"input_file_id": "file-nope", "endpoint": ENDPOINT, "completion_window": "24h"},
    )
    error = assert_openai_error(response, 404, param="input_file_id")
    assert "file-nope" in error["message"]


def test_input_file_with_another_purpose(client: Any, http: httpx.Client) -> None:
    user_file = client.files.create(file=("u.jsonl", jsonl(requests(2))), purpose="user_data")
    response = http.post(
        "/v1/batches",
        json={"input_file_id": user_file.id, "endpoint": ENDPOINT, "completion_window": "24h"},
    )
    assert_openai_error(response, 400, param="input_file_id")


def test_deleted_input_file(client: Any, http: httpx.Client) -> None:
    gone = client.files.create(file=("g.jsonl", jsonl(requests(2))), purpose="batch")
    client.files.delete(gone.id)
    response = http.post(
        "/v1/batches",
        json={"input_file_id": gone.id, "endpoint": ENDPOINT, "completion_window": "24h"},
    )
    assert_openai_error(response, 404, param="input_file_id")


BAD_CREATES: list[tuple[str, dict[str, Any], str | None]] = [
    # (id, fields over a good body, param)
    ("unsupported-endpoint", {"endpoint": "/v1/completions"}, "endpoint"),
    ("translations-endpoint", {"endpoint": "/v1/audio/translations"}, "endpoint"),
    ("unsupported-window", {"completion_window": "1h"}, "completion_window"),
    ("17-metadata-pairs", {"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ("metadata-number", {"metadata": {"k": 1}}, "metadata"),
    ("metadata-key-65", {"metadata": {"k" * 65: "v"}}, "metadata"),
    ("metadata-value-513", {"metadata": {"k": "v" * 513}}, "metadata"),
    (
        "output-expiry-too-short",
        {"output_expires_after": {"anchor": "created_at", "seconds": 60}},
        None,
    ),
    ("input-file-not-a-string", {"input_file_id": 7}, "input_file_id"),
    ("missing-input-file", {"input_file_id": None}, "input_file_id"),
    ("missing-endpoint", {"endpoint": None}, "endpoint"),
    ("missing-window", {"completion_window": None}, "completion_window"),
]


@pytest.mark.parametrize(
    ("over", "param"), [c[1:] for c in BAD_CREATES], ids=[c[0] for c in BAD_CREATES]
)
def test_bad_create(
    http: httpx.Client, input_file: str, over: dict[str, Any], param: str | None
) -> None:
    body = {"input_file_id": input_file, "endpoint": ENDPOINT, "completion_window": "24h"}
    body.update(over)
    body = {k: v for k, v in body.items() if v is not None}
    error = assert_openai_error(http.post("/v1/batches", json=body), 400)
    if param is not None:
        assert error["param"] == param, error
    else:
        assert str(error["param"]).startswith("output_expires_after"), error


def test_create_with_a_body_that_is_not_json(http: httpx.Client) -> None:
    response = http.post(
        "/v1/batches", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_openai_error(response, 400)


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 101}, {"limit": -1}, {"limit": "ten"}])
def test_bad_batch_list_parameters(http: httpx.Client, params: dict[str, Any]) -> None:
    assert_openai_error(http.get("/v1/batches", params=params), 400)  # never FastAPI's 422


def test_a_bad_list_parameter_is_named(http: httpx.Client) -> None:
    error = assert_openai_error(http.get("/v1/batches", params={"limit": 0}), 400)
    assert error["param"] == "limit"


def test_batch_list_after_an_unknown_batch(http: httpx.Client) -> None:
    assert_openai_error(http.get("/v1/batches", params={"after": "batch_nope"}), 400)


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/batches/batch_nope"), ("POST", "/v1/batches/batch_nope/cancel")],
)
def test_unknown_batch(http: httpx.Client, method: str, path: str) -> None:
    error = assert_openai_error(http.request(method, path), 404)
    assert "batch_nope" in error["message"]


def test_unknown_batch_through_the_client(client: Any) -> None:
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError):
        client.batches.cancel("batch_nope")


def test_an_upload_over_the_file_limit(http: httpx.Client) -> None:
    for size in (MAX_FILE_BYTES + 1, MAX_FILE_BYTES + 2 * 1024 * 1024):  # store, middleware
        response = http.post(
            "/v1/files", data={"purpose": "batch"}, files={"file": ("big.jsonl", b"x" * size)}
        )
        assert_openai_error(response, 413)


# -- input files that fail validation -------------------------------------------------------------


def raw_line(**fields: Any) -> bytes:
    obj = request("x", "hello")
    obj.update(fields)
    return json.dumps({k: v for k, v in obj.items() if v is not None}).encode()


FAILING_FILES: list[tuple[str, list[Any], str, int | None, str | None]] = [
    # (id, lines, code, line, param) of the first error listed
    (
        "duplicate-custom-id",
        [request("a", "1"), request("b", "2"), request("a", "3")],
        "duplicate_custom_id",
        3,
        "custom_id",
    ),
    (
        "non-json-line",
        [request("a", "1"), b'{"custom_id": "b", ', request("c", "3")],
        "invalid_json_line",
        2,
        None,
    ),
    (
        "wrong-url",
        [request("a", "1"), raw_line(custom_id="b", url="/v1/chat/completions")],
        "invalid_url",
        2,
        "url",
    ),
    (
        "wrong-method",
        [request("a", "1"), raw_line(custom_id="b", method="GET")],
        "invalid_method",
        2,
        "method",
    ),
    (
        "unknown-model",
        [request("a", "1", model="nobody/nothing")],
        "model_not_found",
        1,
        "body.model",
    ),
    (
        "mixed-models",
        [request("a", "1"), request("b", "2", model=SLOW)],
        "mismatched_model",
        2,
        "body.model",
    ),
    ("too-many-lines", requests(MAX_LINES + 1), "too_many_requests", MAX_LINES + 1, None),
    (
        "non-utf8",
        [request("a", "1"), b'{"custom_id": "\xff\xfe", "method": "POST"}'],
        "invalid_file_encoding",
        2,
        None,
    ),
    (
        "missing-custom-id",
        [request("a", "1"), raw_line(custom_id=None)],
        "missing_required_parameter",
        2,
        "custom_id",
    ),
    ("numeric-custom-id", [raw_line(custom_id=12)], "invalid_custom_id", 1, "custom_id"),
    ("missing-body", [raw_line(body=None)], "missing_required_parameter", 1, "body"),
    ("empty-file", [], "empty_file", None, None),
]


@pytest.fixture(scope="module")
def failed_batches(client: Any) -> dict[str, Any]:
    """Every failing file submitted at once, then awaited (validation runs in a worker)."""
    made = {}
    for case, lines, *_ in FAILING_FILES:
        made[case] = submit(client, lines).id
    return {case: wait_finished(client, batch_id) for case, batch_id in made.items()}


@pytest.mark.parametrize(
    ("case", "code", "line", "param"),
    [(c[0], *c[2:]) for c in FAILING_FILES],
    ids=[c[0] for c in FAILING_FILES],
)
def test_a_bad_input_file_fails_the_batch(
    failed_batches: dict[str, Any],
    http: httpx.Client,
    case: str,
    code: str,
    line: int | None,
    param: str | None,
) -> None:
    batch = failed_batches[case]
    assert batch.status == "failed", batch
    assert batch.failed_at is not None and batch.in_progress_at is None
    assert batch.output_file_id is None and batch.error_file_id is None
    assert batch.request_counts.completed == 0 and batch.request_counts.failed == 0
    raw = http.get(f"/v1/batches/{batch.id}").json()
    assert raw["errors"]["object"] == "list"
    first = raw["errors"]["data"][0]
    assert set(first) == {"code", "line", "message", "param"}
    assert (first["code"], first["line"], first["param"]) == (code, line, param)
    assert first["message"]


def test_cancel_of_a_finished_batch(
    failed_batches: dict[str, Any], client: Any, http: httpx.Client
) -> None:
    finished = [failed_batches["empty-file"].id]
    done = wait_finished(client, submit(client, requests(2)).id)
    assert done.status == "completed"
    finished.append(done.id)
    for batch_id in finished:
        response = http.post(f"/v1/batches/{batch_id}/cancel")
        assert_openai_error(response, 400, code="batch_not_cancellable")
        with pytest.raises(openai.BadRequestError):
            client.batches.cancel(batch_id)
    assert client.batches.retrieve(done.id).status == "completed"


# -- cancel and expiry -----------------------------------------------------------------------------


def test_cancel_mid_run(client: Any) -> None:
    lines = requests(600, model=SLOW, fail_every=50)
    ids = [x["custom_id"] for x in lines]
    batch = submit(client, lines)
    wait_running(client, batch.id)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling"
    assert cancelling.cancelling_at is not None
    batch = wait_finished(client, batch.id, timeout=60)
    assert batch.status == "cancelled", batch
    assert batch.cancelled_at >= batch.cancelling_at
    counts = batch.request_counts
    assert counts.total == 600
    assert counts.completed > 0
    assert counts.completed + counts.failed < counts.total
    output, errors = results(client, batch)
    assert len(output) == counts.completed and len(errors) == counts.failed
    seen = [x["custom_id"] for x in output + errors]
    assert len(seen) == len(set(seen)) and set(seen) <= set(ids)
    assert_input_order(ids, output)
    assert batch.usage.input_tokens == sum(
        x["response"]["body"]["usage"]["prompt_tokens"] for x in output
    )
    assert client.batches.cancel(batch.id).status == "cancelled"  # cancelling again is harmless


def test_expiry_mid_run(client: Any, stack: Stack) -> None:
    stack.restart_api({"LANEWAY_COMPLETION_WINDOW_S": str(EXPIRY_WINDOW_S)}, healthy=True)
    try:
        lines = requests(400, model=SLOWER)
        ids = [x["custom_id"] for x in lines]
        batch = submit(client, lines)
        assert batch.expires_at == batch.created_at + EXPIRY_WINDOW_S
        batch = wait_finished(client, batch.id, timeout=60)
    finally:
        stack.restart_api({}, healthy=True)
    assert batch.status == "expired", batch
    assert batch.expired_at is not None and batch.completed_at is None
    counts = batch.request_counts
    assert counts.total == 400 and counts.completed + counts.failed == 400
    assert counts.completed < 400
    output, errors = results(client, batch)
    assert_exactly_once(ids, output, errors)
    assert_input_order(ids, output)
    assert len(output) == counts.completed and len(errors) == counts.failed
    for entry in errors:
        assert entry["response"] is None
        assert entry["error"]["code"] == "batch_expired"
        assert entry["error"]["message"]


def test_stack_still_serves_batches(client: Any, stack: Stack) -> None:
    """After the expiry test the restored API runs a batch in the normal window."""
    batch = submit(client, requests(3))
    assert batch.expires_at == batch.created_at + 24 * 3600
    assert wait_finished(client, batch.id).status == "completed"
