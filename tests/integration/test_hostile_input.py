"""Hostile input against a real stack (fake model): every answer a clear 4xx in OpenAI's
shape, never a 500, nothing stored that cannot be read back, nothing left behind.

Each create call's fields are sent as the wrong JSON type, as null and as a 1 MB string;
the strings that are stored or echoed get lone surrogates, NUL, right-to-left marks and
emoji; ids in paths and cursors get what no id holds; file names are not Latin-1 and
longer than their column; Idempotency-Keys are longer than theirs. The suite runs on
SQLite and, in CI, on Postgres (which refuses NUL and over-long strings outright).
"""

from __future__ import annotations

import collections
import json
import socket
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, unquote

import httpx
import pytest

from tests.harness import Stack
from tests.integration.batch_support import (
    ENDPOINT,
    FAKE,
    fake_stack,
    jsonl,
    request,
    submit,
    wait_finished,
)
from tests.integration.helpers import assert_openai_error

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

MB_STRING = "x" * (1024 * 1024)


def describe(value: Any) -> str:
    """What a failing assertion says about a value (never the megabyte itself)."""
    text = repr(value)
    return text if len(text) < 60 else f"{type(value).__name__} of {len(text)} characters"


WRONG_TYPES: list[Any] = [12345, 1.5, True, [], {}, ["a", 1], {"a": None}, None, MB_STRING]
ODD_TEXT = {
    "lone-surrogate": "bad \ud800 text",
    "nul": "nul \x00 inside",
    "rtl": "\u202eevil\u200f mark",
    "emoji": "rocket \U0001f680 \u05e9\u05dc\u05d5\u05dd",
}
MAX_FILE_BYTES = 8 * 1024 * 1024


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = fake_stack(
        tmp_path_factory.mktemp("hostile-stack"),
        entries=[],
        env={
            "LANEWAY_MAX_FILE_BYTES": str(MAX_FILE_BYTES),
            "LANEWAY_MAX_REQUEST_BYTES": str(4 << 20),
        },
    )
    try:
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="module")
def http(stack: Stack) -> Iterator[httpx.Client]:
    with stack.http(timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def input_file(http: httpx.Client) -> str:
    response = http.post(
        "/v1/files",
        data={"purpose": "batch"},
        files={"file": ("in.jsonl", jsonl([request("a", "hello")]))},
    )
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def raw_json(value: Any) -> bytes:
    """JSON as a hostile client writes it: lone surrogates stay escapes, not errors."""
    return json.dumps(value).encode()


def post_json(http: httpx.Client, path: str, body: Any, **kw: Any) -> httpx.Response:
    headers = {"content-type": "application/json", **kw.pop("headers", {})}
    return http.post(path, content=raw_json(body), headers=headers, **kw)


def assert_refused(response: httpx.Response, *allowed: int) -> dict[str, Any] | None:
    """Never a 5xx; an error is OpenAI-shaped with one of ``allowed`` (any 4xx if none)."""
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code < 400:
        return None
    if allowed:
        assert response.status_code in allowed, (response.status_code, response.text[:300])
    assert len(response.content) < 10_000, "an error body that large echoes the input"
    return assert_openai_error(response, response.status_code)


def raw_upload(http: httpx.Client, filename: bytes, *, purpose: bytes = b"batch") -> httpx.Response:
    """An upload whose part headers hold exactly these bytes (httpx would percent-encode
    a NUL or a quote in a file name; a hostile client does not)."""
    body = (
        b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n' + purpose + b"\r\n"
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="' + filename + b'"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n{}\n\r\n--b--\r\n"
    )
    return http.post(
        "/v1/files", content=body, headers={"content-type": "multipart/form-data; boundary=b"}
    )


def blobs(stack: Stack) -> set[str]:
    """The uploads' blobs in the file store (``files/file-<id>``). Batches that earlier
    tests created finish meanwhile; their result files live under ``results/``."""
    root = stack.root / "files" / "files"
    return {p.name for p in root.iterdir()} if root.is_dir() else set()


def uploads(http: httpx.Client) -> int:
    """How many files of purpose batch are listed (result files of batches that finish
    meanwhile are batch_output, and do not count)."""
    return len(http.get("/v1/files", params={"purpose": "batch"}).json()["data"])


def assert_still_serving(http: httpx.Client) -> None:
    response = http.post(ENDPOINT, json={"model": FAKE, "input": "still serving"})
    assert response.status_code == 200, response.text
    assert http.get("/health").status_code == 200


# -- every field of every create call ----------------------------------------------------------

EMBEDDING_FIELDS = ["input", "model", "encoding_format", "dimensions", "user"]
BATCH_FIELDS = [
    "input_file_id",
    "endpoint",
    "completion_window",
    "metadata",
    "output_expires_after",
]


@pytest.mark.parametrize("field", EMBEDDING_FIELDS)
def test_embeddings_fields_of_the_wrong_type(http: httpx.Client, field: str) -> None:
    for value in WRONG_TYPES:
        body = {"model": FAKE, "input": "hello", field: value}
        error = assert_refused(post_json(http, ENDPOINT, body), 400, 404)
        if error is None:  # valid: a long user string or input (one word to the fake
            # tokenizer), or dimensions left out
            accepted = (
                ("user", MB_STRING),
                ("user", None),
                ("input", MB_STRING),
                ("dimensions", None),
            )
            assert (field, value) in accepted, describe(value)
        else:
            assert len(error["message"]) < 1000, "the message echoes the value"
    assert_still_serving(http)


@pytest.mark.parametrize("field", BATCH_FIELDS)
def test_batch_fields_of_the_wrong_type(http: httpx.Client, input_file: str, field: str) -> None:
    for value in WRONG_TYPES:
        body = {"input_file_id": input_file, "endpoint": ENDPOINT, "completion_window": "24h"}
        body[field] = value
        error = assert_refused(post_json(http, "/v1/batches", body), 400, 404)
        if error is None:  # null is "not given" for the optional ones; {} is no metadata
            optional = field in ("metadata", "output_expires_after")
            given_nothing = value is None or (field == "metadata" and value == {})
            assert optional and given_nothing, describe(value)
        else:
            assert len(error["message"]) < 1000, "the message echoes the value"
    assert_still_serving(http)


@pytest.mark.parametrize(
    "nested",
    [
        {"output_expires_after": {"anchor": "created_at", "seconds": "3600"}},
        {"output_expires_after": {"anchor": "created_at", "seconds": 3600.5}},
        {"output_expires_after": {"anchor": 1, "seconds": 3600}},
        {"output_expires_after": {"anchor": "created_at", "seconds": None}},
        {"output_expires_after": {"anchor": "created_at", "seconds": 10**30}},
        {"output_expires_after": {"anchor": "created_at", "seconds": True}},
        {"output_expires_after": []},
        {"metadata": {"k": 1}},
        {"metadata": {"k": None}},
        {"metadata": {"k": ["v"]}},
        {"metadata": {"k": {"v": "w"}}},
    ],
    ids=repr,
)
def test_nested_batch_fields_of_the_wrong_type(
    http: httpx.Client, input_file: str, nested: dict[str, Any]
) -> None:
    body = {"input_file_id": input_file, "endpoint": ENDPOINT, "completion_window": "24h"}
    error = assert_refused(post_json(http, "/v1/batches", {**body, **nested}), 400)
    assert error is not None and str(error["param"]).startswith(next(iter(nested))), error


@pytest.mark.parametrize(
    "name", [b'quo"te.jsonl', b"\xff\xfe bytes.jsonl", b"\xed\xa0\x80 surrogate.jsonl"], ids=repr
)
def test_file_name_bytes_a_browser_would_not_send(http: httpx.Client, name: bytes) -> None:
    response = raw_upload(http, name)
    assert_refused(response, 400)
    if response.status_code == 200:
        down = http.get(f"/v1/files/{response.json()['id']}/content")
        assert down.status_code == 200 and down.content == b"{}\n"


@pytest.mark.parametrize(
    "fields",
    [
        {"purpose": "x" * (1024 * 1024)},
        {
            "purpose": "batch",
            "expires_after[anchor]": "created_at",
            "expires_after[seconds]": "1e4",
        },
        {"purpose": "batch", "expires_after[anchor]": MB_STRING, "expires_after[seconds]": "3600"},
        {"purpose": "batch", "expires_after[seconds]": "9" * 400},
        {"purpose": "batch", "expires_after[seconds]": "-3600"},
        {"purpose": "batch", "expires_after[anchor]": "created_at"},
        {"purpose": ""},
    ],
    ids=lambda f: ",".join(f"{k}={v[:12]!r}" for k, v in f.items()),
)
def test_upload_fields_of_the_wrong_kind(
    http: httpx.Client, stack: Stack, fields: dict[str, str]
) -> None:
    before = blobs(stack)
    response = http.post("/v1/files", data=fields, files={"file": ("in.jsonl", b"{}\n")})
    assert_refused(response, 400)
    assert blobs(stack) == before


def test_a_purpose_with_a_nul(http: httpx.Client) -> None:
    assert_refused(raw_upload(http, b"in.jsonl", purpose=b"batch\x00"), 400)


def test_upload_where_file_is_a_plain_field(http: httpx.Client) -> None:
    response = http.post("/v1/files", data={"purpose": "batch", "file": "not a file"})
    assert_refused(response, 400)


# -- strings that are stored or echoed ----------------------------------------------------------


@pytest.mark.parametrize("kind", list(ODD_TEXT))
def test_odd_text_in_metadata(http: httpx.Client, input_file: str, kind: str) -> None:
    text = ODD_TEXT[kind]
    for metadata in ({"k": text}, {text: "v"}):
        body = {
            "input_file_id": input_file,
            "endpoint": ENDPOINT,
            "completion_window": "24h",
            "metadata": metadata,
        }
        response = post_json(http, "/v1/batches", body)
        if kind in ("lone-surrogate", "nul"):  # cannot be stored, or read back as text
            error = assert_refused(response, 400)
            assert error is not None and error["param"] == "metadata"
            continue
        assert response.status_code == 200, response.text
        batch_id = response.json()["id"]
        assert response.json()["metadata"] == metadata
        assert http.get(f"/v1/batches/{batch_id}").json()["metadata"] == metadata
        http.post(f"/v1/batches/{batch_id}/cancel")


@pytest.mark.parametrize("kind", list(ODD_TEXT))
def test_odd_text_in_the_model_name_is_not_echoed_raw(http: httpx.Client, kind: str) -> None:
    response = post_json(http, ENDPOINT, {"model": ODD_TEXT[kind], "input": "hi"})
    error = assert_refused(response, 404)
    assert error is not None and error["code"] == "model_not_found"
    response.content.decode("utf-8")  # the body is valid UTF-8 whatever was sent


@pytest.mark.parametrize("kind", list(ODD_TEXT))
def test_odd_text_in_custom_ids_round_trips_through_a_batch(stack: Stack, kind: str) -> None:
    client = stack.openai_client(max_retries=0)
    text = ODD_TEXT[kind]
    lines = [request(f"{text}-{i}", f"line {i}") for i in range(3)]
    batch = wait_finished(client, submit(client, lines).id)
    assert batch.status == "completed", batch
    raw = httpx.get(f"{stack.base_url}/v1/files/{batch.output_file_id}/content").content
    got = [json.loads(x)["custom_id"] for x in raw.splitlines()]
    assert got == [f"{text}-{i}" for i in range(3)]


@pytest.mark.parametrize(
    "name",
    [
        "données-日本語-🚀.jsonl",
        "\u202efdp.exe\u200f.jsonl",
        "back\\slash;semi,comma.jsonl",
        "x" * 512,
    ],
    ids=["non-latin-1", "rtl", "separators", "512-chars"],
)
def test_any_file_name_downloads(http: httpx.Client, name: str) -> None:
    """Headers are Latin-1: the name travels as RFC 6266 filename*=UTF-8''..."""
    up = http.post("/v1/files", data={"purpose": "user_data"}, files={"file": (name, b"data\n")})
    assert up.status_code == 200, up.text
    assert up.json()["filename"] == name
    down = http.get(f"/v1/files/{up.json()['id']}/content")
    assert down.status_code == 200, down.text
    assert down.content == b"data\n"
    disposition = down.headers["content-disposition"]
    assert disposition.isascii()
    encoded = disposition.split("filename*=UTF-8''", 1)[1]
    assert unquote(encoded) == name


@pytest.mark.parametrize(
    ("name", "why"),
    [(b"x" * 513, "longer than 512"), (b"a\x00b.jsonl", "NUL")],
    ids=["513-chars", "nul"],
)
def test_a_file_name_that_cannot_be_stored(
    http: httpx.Client, stack: Stack, name: bytes, why: str
) -> None:
    before = blobs(stack)
    response = raw_upload(http, name)
    error = assert_refused(response, 400)
    assert error is not None and error["param"] == "file" and why in error["message"]
    assert blobs(stack) == before, "a refused upload left its blob behind"


@pytest.mark.parametrize("key", ["k" * 257, "\u00e9t\u00e9-cl\u00e9\xff"], ids=["257", "latin-1"])
def test_idempotency_keys(http: httpx.Client, stack: Stack, input_file: str, key: str) -> None:
    before = blobs(stack)
    headers = {"Idempotency-Key": key.encode("latin-1")}  # what HTTP headers carry
    up = http.post(
        "/v1/files",
        data={"purpose": "batch"},
        files={"file": ("in.jsonl", b"{}\n")},
        headers=headers,
    )
    body = {"input_file_id": input_file, "endpoint": ENDPOINT, "completion_window": "24h"}
    create = post_json(http, "/v1/batches", body, headers=headers)
    if len(key) > 256:
        for response in (up, create):
            error = assert_refused(response, 400)
            assert error is not None and error["param"] == "Idempotency-Key"
        assert blobs(stack) == before
    else:
        assert up.status_code == 200 and create.status_code == 200, (up.text, create.text)
        again = http.post(
            "/v1/files",
            data={"purpose": "batch"},
            files={"file": ("other.jsonl", b"{}\n")},
            headers=headers,
        )
        assert again.json()["id"] == up.json()["id"]


# -- ids in paths and cursors -----------------------------------------------------------------

ODD_IDS = ["file-\x00", "batch_\x00x", "\u202e", "x" * 300, "..", "%2e%2e%2fetc", "\ud800"]


@pytest.mark.parametrize("value", ODD_IDS, ids=repr)
def test_odd_ids_in_paths_are_404(http: httpx.Client, value: str) -> None:
    for method, path in (
        ("GET", "/v1/files/{}"),
        ("GET", "/v1/files/{}/content"),
        ("DELETE", "/v1/files/{}"),
        ("GET", "/v1/batches/{}"),
        ("POST", "/v1/batches/{}/cancel"),
        ("GET", "/v1/models/{}"),
    ):
        url = path.format(quote(value.encode("utf-8", "surrogatepass"), safe=""))
        assert_refused(http.request(method, url), 404)


@pytest.mark.parametrize("value", ODD_IDS, ids=repr)
def test_odd_cursors_and_filters(http: httpx.Client, value: str) -> None:
    query = quote(value.encode("utf-8", "surrogatepass"), safe="")
    assert_refused(http.get(f"/v1/files?after={query}"), 400)
    assert_refused(http.get(f"/v1/batches?after={query}"), 400)
    assert_refused(http.get(f"/v1/files?purpose={query}"), 400)


def test_an_input_file_id_no_file_can_have(http: httpx.Client) -> None:
    for value in ODD_IDS:
        body = {"input_file_id": value, "endpoint": ENDPOINT, "completion_window": "24h"}
        assert_refused(post_json(http, "/v1/batches", body), 404)


# -- uploads that fail leave nothing ----------------------------------------------------------


def test_an_upload_over_the_limit_leaves_no_row_and_no_blob(
    http: httpx.Client, stack: Stack
) -> None:
    before, listed = blobs(stack), uploads(http)
    big = b"x" * (MAX_FILE_BYTES + 1)  # within the body limit's slack, over the file limit
    response = http.post("/v1/files", data={"purpose": "batch"}, files={"file": ("big", big)})
    assert_refused(response, 413)
    assert blobs(stack) == before
    assert uploads(http) == listed


def test_a_client_that_hangs_up_mid_upload_leaves_nothing(http: httpx.Client, stack: Stack) -> None:
    before, listed = blobs(stack), uploads(http)
    boundary = "hangup"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", stack.api_port or 0), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/files HTTP/1.1\r\nHost: x\r\n"
            + f"Content-Type: multipart/form-data; boundary={boundary}\r\n".encode()
            + f"Content-Length: {4 * 1024 * 1024}\r\n\r\n".encode()
            + head
            + b"y" * (1024 * 1024)
        )
        time.sleep(0.3)
    time.sleep(0.5)
    assert blobs(stack) == before
    assert uploads(http) == listed
    assert_still_serving(http)


def test_the_stack_survived(stack: Stack, http: httpx.Client) -> None:
    assert_still_serving(http)
    for proc in stack.processes():
        assert proc.alive(), proc.name
    assert stack.api is not None and "Traceback" not in stack.api.log()


# -- what a scanner does to /metrics ------------------------------------------------------------


def metric_series(http: httpx.Client) -> set[str]:
    """Every series /metrics exposes (name and labels, without the value)."""
    text = http.get("/metrics").text
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and line[0] != "#"}


def test_random_paths_and_model_names_add_no_metric_series(
    http: httpx.Client, stack: Stack
) -> None:
    """Labels come from the route template and the served model ids, never from what the
    client sent: 10,000 random paths and model names leave the series as they were."""
    import asyncio
    import random
    import string

    import aiohttp

    def junk(n: int) -> str:
        return "".join(random.choices(string.ascii_letters + string.digits + "-_.~", k=n))

    async def scan(n: int) -> collections.Counter[int]:
        statuses: collections.Counter[int] = collections.Counter()
        async with aiohttp.ClientSession(stack.base_url) as session:

            async def one(i: int) -> None:
                if i % 2:
                    async with session.get(f"/{junk(12)}/{junk(8)}") as response:
                        statuses[response.status] += 1
                else:
                    body = {"model": junk(16), "input": "x"}
                    async with session.post(ENDPOINT, json=body) as response:
                        statuses[response.status] += 1

            for start in range(0, n, 200):
                await asyncio.gather(*(one(i) for i in range(start, min(start + 200, n))))
        return statuses

    asyncio.run(scan(20))  # every kind of answer once, so its series exist
    metric_series(http)  # and the scrape's own
    before = metric_series(http)
    statuses = asyncio.run(scan(10_000))
    after = metric_series(http)
    assert statuses == {404: 10_000}
    assert after == before, sorted(after - before)[:10]
    assert any('route="unmatched"' in s for s in after)
    assert any('model="other"' in s for s in after)
