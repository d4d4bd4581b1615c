"""tasks.errors: the hierarchy, its HTTP statuses and the wire round trip."""

from __future__ import annotations

import json

import pytest

from tasks import errors
from tasks.errors import LanewayError

ALL = [
    errors.LanewayError,
    errors.InvalidRequest,
    errors.ContextLengthExceeded,
    errors.AuthenticationFailed,
    errors.NotFound,
    errors.ModelNotFound,
    errors.InternalError,
    errors.PayloadTooLarge,
    errors.QueueFull,
    errors.ClientGone,
    errors.ServiceUnavailable,
    errors.StorageFull,
    errors.DatabaseUnavailable,
    errors.GatewayTimeout,
]


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_round_trip_keeps_class_message_param_code(cls: type[LanewayError]) -> None:
    original = cls("something went wrong", param="input", code="custom_code")
    wire = json.loads(json.dumps(original.to_wire()))  # it travels as JSON
    back = LanewayError.from_wire(wire)
    assert type(back) is cls
    assert back.message == "something went wrong"
    assert back.param == "input"
    assert back.code == "custom_code"
    assert back.status_code == original.status_code


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_default_code_survives(cls: type[LanewayError]) -> None:
    back = LanewayError.from_wire(cls("m").to_wire())
    assert back.code == cls.default_code
    assert back.param is None


@pytest.mark.parametrize(
    ("cls", "status"),
    [
        (errors.InvalidRequest, 400),
        (errors.ContextLengthExceeded, 400),
        (errors.AuthenticationFailed, 401),
        (errors.ModelNotFound, 404),
        (errors.PayloadTooLarge, 413),
        (errors.QueueFull, 429),
        (errors.ClientGone, 499),
        (errors.ServiceUnavailable, 503),
        (errors.StorageFull, 503),
        (errors.DatabaseUnavailable, 503),
        (errors.GatewayTimeout, 504),
        (errors.LanewayError, 500),
    ],
)
def test_status_codes(cls: type[LanewayError], status: int) -> None:
    assert cls.status_code == status


def test_unknown_kind_becomes_the_base_class() -> None:
    back = LanewayError.from_wire({"kind": "SomethingNew", "message": "x", "code": "c"})
    assert type(back) is LanewayError
    assert (back.message, back.code, back.status_code) == ("x", "c", 500)


def test_empty_wire_dict() -> None:
    back = LanewayError.from_wire({})
    assert type(back) is LanewayError
    assert back.message == ""


def test_queue_full_retry_after() -> None:
    assert errors.QueueFull("full").retry_after == 1
    assert errors.QueueFull("full", retry_after=5).retry_after == 5


def test_context_length_is_an_invalid_request() -> None:
    assert issubclass(errors.ContextLengthExceeded, errors.InvalidRequest)
    assert errors.ContextLengthExceeded("x").code == "context_length_exceeded"


def test_the_error_body_is_openais_shape() -> None:
    assert errors.InvalidRequest("bad", param="input", code="c").body() == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "input", "code": "c"}
    }


def test_an_internal_error_names_the_request_and_nothing_else() -> None:
    exc = errors.InternalError.for_request("req_123")
    assert exc.status_code == 500 and exc.error_type == "server_error"
    assert "req_123" in exc.message
    assert "req_" not in errors.InternalError.for_request(None).message


def test_quote_bounds_what_a_message_echoes() -> None:
    assert errors.quote("short") == "'short'"
    long = errors.quote("x" * 10**6)
    assert len(long) <= errors.QUOTE_MAX and long.startswith("'xxx") and long.endswith("...'")


def _pydantic_errors(body: object) -> list[dict[str, object]]:
    from pydantic import ValidationError

    from tasks.contracts.embeddings import EmbeddingRequest

    try:
        EmbeddingRequest.model_validate(body)
    except ValidationError as exc:
        return [dict(e) for e in exc.errors()]
    raise AssertionError("expected a validation error")


@pytest.mark.parametrize(
    ("body", "param", "contains"),
    [
        ({"input": "x"}, "model", "Missing required parameter: 'model'."),
        ({"model": "m", "input": 5}, "input", "a list of token ids"),
        ({"model": "m", "input": "x", "dimensions": "8"}, "dimensions", "'dimensions'"),
        ({"model": "m", "input": "x", "encoding_format": "hex"}, "encoding_format", "'float'"),
        ([], None, "must be a JSON object"),
    ],
)
def test_one_translation_for_live_routes_and_batch_lines(
    body: object, param: str | None, contains: str
) -> None:
    """FastAPI prefixes locations with where the value came from ('body'); a batch line's
    pydantic error does not. Both must give the same message (the API handler drops the
    source with ``unsourced``)."""
    from tasks.contracts.embeddings import FIELD_HINTS

    batch = errors.invalid_request(_pydantic_errors(body), FIELD_HINTS)
    live = errors.invalid_request(
        errors.unsourced([{**e, "loc": ("body", *e["loc"])} for e in _pydantic_errors(body)]),  # type: ignore[misc]
        FIELD_HINTS,
    )
    assert (batch.message, batch.param) == (live.message, live.param)
    assert batch.param == param
    assert contains in batch.message, batch.message


def test_a_field_named_like_a_source_keeps_its_name() -> None:
    """Only FastAPI's leading source is cut: a body field called ``query`` (rerank's) is
    named in the message, live or in a batch line."""
    line = [{"type": "string_type", "loc": ("query",), "msg": "Input should be a valid string"}]
    live = [{**line[0], "loc": ("body", "query")}]
    for found in (errors.invalid_request(line), errors.invalid_request(errors.unsourced(live))):
        assert found.param == "query"
        assert "'query'" in found.message


def test_a_field_hint_is_its_contracts_own() -> None:
    """Two capabilities may both call a field ``input``: each error says what its own
    contract allows (embeddings takes token ids, classify does not)."""
    from tasks.contracts import classify, embeddings

    bad = [
        {"type": "string_type", "loc": ("input", "str"), "msg": "Input should be a valid string"}
    ]
    said = {
        m.CAPABILITY: errors.invalid_request(bad, m.FIELD_HINTS).message
        for m in (embeddings, classify)
    }
    assert "token ids" in said["embeddings"]
    assert "token ids" not in said["classify"] and "list of strings" in said["classify"]
