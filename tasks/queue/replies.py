"""Live replies on the wire: what a worker pushes on an API process's reply list.

A reply is one frame: a JSON header, a newline, then a body the API passes on untouched
(for embeddings, the response's ``data`` array already encoded as the caller asked). The
header says which request it answers and how: ``{"id", "event": "done", ...}`` with
capability fields such as ``usage``, or ``{"id", "event": "error", "error": {...}}``.
A one-shot reply is a stream of one ``done``; streaming capabilities send ``delta``
frames before it, in order, on the same list (one list per API process keeps them in
order, and a pop takes each frame exactly once).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

DONE = "done"
DELTA = "delta"
ERROR = "error"


@dataclass(frozen=True, slots=True)
class Reply:
    request_id: str
    event: str
    header: dict[str, Any]
    body: bytes


def encode_reply(request_id: str, event: str, body: bytes = b"", **fields: Any) -> bytes:
    return orjson.dumps({"id": request_id, "event": event, **fields}) + b"\n" + body


def decode_reply(frame: bytes) -> Reply:
    """Raises ``ValueError`` for a frame that is not one (orjson never writes a raw newline)."""
    head, sep, body = frame.partition(b"\n")
    if not sep:
        raise ValueError("a reply frame needs a header line")
    header = orjson.loads(head)
    if not isinstance(header, dict) or not isinstance(header.get("id"), str):
        raise ValueError("a reply header is an object with an id")
    return Reply(header["id"], str(header.get("event", DONE)), header, body)
