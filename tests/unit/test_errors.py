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
    errors.Conflict,
    errors.PayloadTooLarge,
    errors.QueueFull,
    errors.ClientGone,
    errors.ServiceUnavailable,
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
