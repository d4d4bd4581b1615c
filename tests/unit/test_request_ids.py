"""Request ids (api/request_ids.py) and the JSON log lines that carry them (configs/logs.py)."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from api.request_ids import MAX_LENGTH, request_id_of
from configs import logs


@pytest.mark.parametrize(
    "given",
    [b"abc", b"trace-7f3a.b_c:d/e+f=", b"x" * MAX_LENGTH, b"550e8400-e29b-41d4-a716"],
)
def test_a_safe_caller_id_is_kept(given: bytes) -> None:
    assert request_id_of({b"x-request-id": given}) == given.decode()


@pytest.mark.parametrize(
    "given",
    [
        b"",
        b"x" * (MAX_LENGTH + 1),
        b"a" * 10_240,
        b"ab\x01cd",
        b"ab\r\nSet-Cookie: x=1",
        b"with space",
        "caf\u00e9".encode(),
        b"<script>",
    ],
)
def test_anything_else_is_replaced_not_echoed(given: bytes) -> None:
    made = request_id_of({b"x-request-id": given})
    assert made.startswith("req_") and len(made) == 36
    assert given.decode("latin-1") not in made or given == b""


def test_no_header_makes_a_fresh_id_each_time() -> None:
    assert request_id_of({}) != request_id_of({})


def _record(**extra: object) -> logging.LogRecord:
    record = logging.LogRecord(
        "laneway.access", logging.INFO, __file__, 1, "request %s", ("x",), None
    )
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_json_lines_carry_the_request_id_and_fields() -> None:
    token = logs.REQUEST_ID.set("trace-1")
    try:
        record = _record(fields={"route": "/v1/embeddings", "status": 200, "latency_ms": 1.5})
        logs.RequestIdFilter().filter(record)
    finally:
        logs.REQUEST_ID.reset(token)
    line = json.loads(logs.JsonFormatter().format(record))
    assert line["request_id"] == "trace-1" and line["msg"] == "request x"
    assert line["route"] == "/v1/embeddings" and line["status"] == 200
    assert line["level"] == "INFO" and line["logger"] == "laneway.access"
    assert line["ts"].endswith("Z")


def test_an_explicit_request_id_wins_and_exceptions_are_one_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = _record(request_id="req_given")
        record.exc_info = sys.exc_info()
    logs.RequestIdFilter().filter(record)
    text = logs.JsonFormatter().format(record)
    assert "\n" not in text
    line = json.loads(text)
    assert line["request_id"] == "req_given" and "ValueError: boom" in line["exc"]


def test_text_format_keeps_per_request_lines_off(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        monkeypatch.setenv(logs.LOG_FORMAT_ENV, "text")
        logs.configure()
        assert not logging.getLogger("laneway.access").isEnabledFor(logging.INFO)
        monkeypatch.setenv(logs.LOG_FORMAT_ENV, "json")
        logs.configure()
        assert logging.getLogger("laneway.access").isEnabledFor(logging.INFO)
        assert isinstance(root.handlers[0].formatter, logs.JsonFormatter)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name in logs.PER_REQUEST_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)
