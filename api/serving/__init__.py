"""Serving logic of the API routes; shared here: reading a JSON request body."""

from __future__ import annotations

import json
from typing import Any

import orjson

from tasks.errors import InvalidRequest, invalid_request


def load_json(raw: bytes) -> tuple[Any, bool]:
    """A request's JSON body, and whether orjson (strict UTF-8) parsed it; the standard
    parser is the fallback, as it also takes lone surrogates (which the contracts then
    refuse by name). An empty body or bad JSON is a 400."""
    if not raw.strip():
        raise InvalidRequest("The request body is empty; send a JSON object.")
    try:
        return orjson.loads(raw), True
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(raw), False
    except (ValueError, UnicodeDecodeError):
        raise invalid_request([{"type": "json_invalid"}]) from None
