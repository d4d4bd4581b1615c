"""Bad requests: the right status, OpenAI's error shape, and a worker still serving after."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import MAIN_MAX_REQUEST_BYTES
from tests.harness import Stack
from tests.integration.helpers import (
    MINILM,
    assert_openai_error,
    assert_still_serving,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def stack(minilm_stack: Stack) -> Stack:
    return minilm_stack


def post(http: httpx.Client, body: Any) -> httpx.Response:
    return http.post("/v1/embeddings", json=body)


CASES: list[tuple[str, Any, int, str | None, str | None]] = [
    # (id, body, status, param, text the message must contain)
    ("unknown-model", {"model": "no/such-model", "input": "x"}, 404, "model", "no/such-model"),
    ("catalog-not-served", {"model": "BAAI/bge-m3", "input": "x"}, 404, "model", None),
    ("empty-string", {"model": MINILM, "input": ""}, 400, "input", "empty"),
    ("empty-list", {"model": MINILM, "input": []}, 400, "input", "empty"),
    ("list-with-empty-string", {"model": MINILM, "input": ["a", ""]}, 400, "input", "empty"),
    ("empty-token-list", {"model": MINILM, "input": [[1012], []]}, 400, "input", "empty"),
    ("2049-inputs", {"model": MINILM, "input": ["x"] * 2049}, 400, "input", "2048"),
    ("input-int", {"model": MINILM, "input": 123}, 400, "input", None),
    ("input-object", {"model": MINILM, "input": {"a": 1}}, 400, "input", None),
    ("input-mixed-list", {"model": MINILM, "input": [1, "a"]}, 400, "input", None),
    ("input-null", {"model": MINILM, "input": None}, 400, "input", None),
    ("input-float-tokens", {"model": MINILM, "input": [1.5, 2.0]}, 400, "input", None),
    ("model-int", {"model": 5, "input": "x"}, 400, "model", None),
    ("missing-model", {"input": "x"}, 400, "model", "model"),
    ("missing-input", {"model": MINILM}, 400, "input", "input"),
    (
        "encoding-hex",
        {"model": MINILM, "input": "x", "encoding_format": "hex"},
        400,
        "encoding_format",
        None,
    ),
    ("dimensions-zero", {"model": MINILM, "input": "x", "dimensions": 0}, 400, "dimensions", None),
    (
        "dimensions-on-minilm",
        {"model": MINILM, "input": "x", "dimensions": 64},
        400,
        "dimensions",
        "dimensions",
    ),
    ("token-out-of-vocab", {"model": MINILM, "input": [[1, 10**9]]}, 400, "input", "vocabulary"),
    ("negative-token", {"model": MINILM, "input": [-1, 5]}, 400, "input", "vocabulary"),
    ("body-is-a-list", ["model", "input"], 400, None, None),
]


@pytest.mark.parametrize(
    ("body", "status", "param", "contains"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_bad_request(
    stack: Stack,
    http: httpx.Client,
    body: Any,
    status: int,
    param: str | None,
    contains: str | None,
) -> None:
    error = assert_openai_error(post(http, body), status, contains=contains)
    if param is not None:
        assert error["param"] == param, error
    if status == 400:
        assert error["type"] == "invalid_request_error"
    assert_still_serving(stack)


def test_unknown_model_code(http: httpx.Client) -> None:
    error = assert_openai_error(post(http, {"model": "x/y", "input": "a"}), 404)
    assert error["code"] == "model_not_found"
    assert MINILM in error["message"]  # says what is served


def test_wrong_types_are_400_never_422(http: httpx.Client) -> None:
    for body in ({"model": MINILM, "input": 123}, {"model": [MINILM], "input": "x"}, {}):
        assert post(http, body).status_code == 400


@pytest.mark.parametrize(
    "make",
    [
        lambda tok: "hello world " * 200,  # ~400 tokens of text
        lambda tok: ["fine", "word " * 300],  # the second item is too long
        lambda tok: [1037] * 255,  # 255 ids + [CLS] + [SEP] = 257
    ],
    ids=["text", "second-item", "token-ids"],
)
def test_input_over_max_tokens(stack: Stack, http: httpx.Client, make: Any) -> None:
    error = assert_openai_error(post(http, {"model": MINILM, "input": make(None)}), 400)
    assert "256" in error["message"]
    assert error["param"] == "input"
    assert error["code"] == "context_length_exceeded"
    assert_still_serving(stack)


@pytest.mark.parametrize(
    "raw",
    [b'{"model": "x", "input": ', b"not json at all", b'{"model": "a",}', b"\xff\xfe"],
    ids=["truncated", "text", "trailing-comma", "binary"],
)
def test_malformed_json(stack: Stack, http: httpx.Client, raw: bytes) -> None:
    response = http.post(
        "/v1/embeddings", content=raw, headers={"content-type": "application/json"}
    )
    error = assert_openai_error(response, 400)
    assert error["type"] == "invalid_request_error"
    assert_still_serving(stack)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "%s", "input": "ok \\ud800 broken"}' % MINILM.encode(),
        b'{"model": "%s", "input": ["fine", "\\udfff"]}' % MINILM.encode(),
    ],
    ids=["string", "list-item"],
)
def test_lone_surrogate_is_400_not_500(stack: Stack, http: httpx.Client, raw: bytes) -> None:
    # valid JSON, but no valid text: tokenizers refuse it, so the API must say 400
    response = http.post(
        "/v1/embeddings", content=raw, headers={"content-type": "application/json"}
    )
    assert_openai_error(response, 400, param="input", contains="surrogate")
    assert_still_serving(stack)


@pytest.mark.parametrize("raw", [b"", b"null", b'"text"', b"[]"], ids=repr)
def test_body_not_an_object(stack: Stack, http: httpx.Client, raw: bytes) -> None:
    response = http.post(
        "/v1/embeddings", content=raw, headers={"content-type": "application/json"}
    )
    error = assert_openai_error(response, 400)
    assert "'None'" not in error["message"]
    assert_still_serving(stack)


def test_malformed_json_message_says_json(http: httpx.Client) -> None:
    response = http.post(
        "/v1/embeddings", content=b"{oops", headers={"content-type": "application/json"}
    )
    assert "JSON" in assert_openai_error(response, 400)["message"]


def big_body() -> bytes:
    body = json.dumps({"model": MINILM, "input": "a" * (MAIN_MAX_REQUEST_BYTES + 10)})
    return body.encode()


def test_oversized_body_by_content_length(stack: Stack, http: httpx.Client) -> None:
    response = http.post(
        "/v1/embeddings", content=big_body(), headers={"content-type": "application/json"}
    )
    error = assert_openai_error(response, 413)
    assert str(MAIN_MAX_REQUEST_BYTES) in error["message"]
    assert_still_serving(stack)


def test_oversized_body_streamed_without_length(stack: Stack, http: httpx.Client) -> None:
    data = big_body()

    def chunks() -> Iterator[bytes]:  # chunked transfer: no content-length to check up front
        for i in range(0, len(data), 64 * 1024):
            yield data[i : i + 64 * 1024]

    response = http.post(
        "/v1/embeddings", content=chunks(), headers={"content-type": "application/json"}
    )
    assert_openai_error(response, 413)
    assert_still_serving(stack)


def test_body_just_under_the_limit_is_parsed(stack: Stack, http: httpx.Client) -> None:
    # under the byte limit, so it reaches validation (and fails there on the item count)
    body = {"model": MINILM, "input": ["x"] * 2049}
    assert len(json.dumps(body)) < MAIN_MAX_REQUEST_BYTES
    assert_openai_error(post(http, body), 400)


def test_openai_client_raises_typed_errors(stack: Stack) -> None:
    import openai

    client = stack.openai_client(max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no/such", input="x")
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=MINILM, input="")
    assert info.value.body["param"] == "input"  # type: ignore[index]
    assert_still_serving(stack)


def test_unknown_route_is_openai_shaped(http: httpx.Client) -> None:
    assert_openai_error(http.get("/v1/nothing-here"), 404)
    assert_openai_error(http.get("/v1/embeddings"), 405)
