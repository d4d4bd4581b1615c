"""The lines of a batch: reading requests from the input file, writing output lines.

Ids in output lines derive from the batch id and the request's position, so a chunk run
twice writes the same ids, and ``response.request_id`` is the id a client quotes back.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tasks.errors import InternalError, LanewayError
from tasks.filestore import FileStore
from tasks.store.safety import parse_json
from tasks.store.usage import Usage

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """One request's result: the HTTP status and body the endpoint would have answered."""

    status_code: int
    body: dict[str, Any]
    usage: Usage = field(default_factory=Usage)

    @classmethod
    def error(cls, exc: LanewayError) -> Outcome:
        return cls(exc.status_code, exc.body())

    @classmethod
    def internal(cls, request_id: str) -> Outcome:
        """An unexpected failure: the line says only which request; the log has the rest."""
        return cls.error(InternalError.for_request(request_id))

    @classmethod
    def failed(cls, exc: BaseException, request_id: str) -> Outcome:
        """A request whose computation raised: its own error, or for anything unexpected
        (logged here with its traceback) the line that names only the request."""
        if isinstance(exc, LanewayError):
            return cls.error(exc)
        log.error("batch request %s failed", request_id, exc_info=exc)
        return cls.internal(request_id)


def _ident(prefix: str, batch_id: str, index: int) -> str:
    return prefix + hashlib.sha256(f"{batch_id}:{index}".encode()).hexdigest()[:24]


def request_id(batch_id: str, index: int) -> str:
    """``response.request_id`` of the request at (0-based) position ``index``."""
    return _ident("req_", batch_id, index)


def _dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def output_line(batch_id: str, index: int, custom_id: str, outcome: Outcome) -> bytes:
    return _dumps(
        {
            "id": _ident("batch_req_", batch_id, index),
            "custom_id": custom_id,
            "response": {
                "status_code": outcome.status_code,
                "request_id": request_id(batch_id, index),
                "body": outcome.body,
            },
            "error": None,
        }
    )


def expired_line(batch_id: str, index: int, custom_id: str) -> bytes:
    return _dumps(
        {
            "id": _ident("batch_req_", batch_id, index),
            "custom_id": custom_id,
            "response": None,
            "error": {
                "code": "batch_expired",
                "message": "This request could not be executed before the completion "
                "window expired.",
            },
        }
    )


def iter_requests(store: FileStore, key: str, start: int, end: int) -> Iterator[dict[str, Any]]:
    """The requests in bytes [start, end) of an input file, one at a time (validation
    already proved each non-blank line there a JSON object, with the same parser)."""
    for raw in store.iter_lines(key, start, end):
        if raw.strip():
            yield parse_json(raw)[0]
