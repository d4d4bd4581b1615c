"""Logging for every laneway process: plain text (the default, what a terminal wants) or
one JSON object per line (``LANEWAY_LOG_FORMAT=json``, what a log shipper wants).

A request's id travels in a context variable (``REQUEST_ID``): the API sets it per HTTP
request, and every record logged while it is set carries it as ``request_id``. Structured
fields go in ``extra={"fields": {...}}``; in JSON they become keys of the line. The
per-request lines (``laneway.access`` in the API, ``laneway.requests`` in workers) are
written only in JSON: in text they would flood a terminal.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextvars import ContextVar
from typing import Any

LOG_LEVEL_ENV = "LANEWAY_LOG_LEVEL"
LOG_FORMAT_ENV = "LANEWAY_LOG_FORMAT"
REQUEST_ID: ContextVar[str | None] = ContextVar("laneway_request_id", default=None)
# the name of the API key a request came with (set by the API's gate; never the key)
KEY_NAME: ContextVar[str | None] = ContextVar("laneway_key_name", default=None)
# one line per request: the API's access log, the workers' per-request log
PER_REQUEST_LOGGERS = ("laneway.access", "laneway.requests")


class RequestIdFilter(logging.Filter):
    """Puts the current request's id (if any) on every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, request id, fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            line["request_id"] = request_id
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def log_format() -> str:
    value = os.environ.get(LOG_FORMAT_ENV, "text").strip().lower()
    return value if value in ("text", "json") else "text"


def configure() -> None:
    """The process's logging, from LANEWAY_LOG_LEVEL and LANEWAY_LOG_FORMAT."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    json_lines = log_format() == "json"
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in PER_REQUEST_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if json_lines else logging.WARNING)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get(LOG_LEVEL_ENV, "INFO"))
