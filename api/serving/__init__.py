"""Serving logic of the API routes; shared here: reading a JSON request body."""

from __future__ import annotations

from typing import Any

from tasks.errors import InvalidRequest, invalid_request
from tasks.store.safety import NESTED_TOO_DEEPLY, JSONTooDeep, parse_json


def load_json(raw: bytes) -> tuple[Any, bool]:
    """A request's JSON body, and whether orjson (strict UTF-8) parsed it (see
    ``tasks.store.safety.parse_json``). An empty body, bad JSON or JSON nested too deeply is a
    400."""
    if not raw.strip():
        raise InvalidRequest("The request body is empty; send a JSON object.")
    try:
        return parse_json(raw)
    except JSONTooDeep:
        raise InvalidRequest(
            f"We could not parse the JSON body of your request: {NESTED_TOO_DEEPLY}."
        ) from None
    except ValueError:  # UnicodeDecodeError is one
        raise invalid_request([{"type": "json_invalid"}]) from None
