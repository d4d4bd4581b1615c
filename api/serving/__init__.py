"""Serving logic of the API routes; shared here: reading a JSON request body, and the rows
a live request of many inputs gets back (one per input)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from tasks.errors import InternalError, InvalidRequest, invalid_request
from tasks.store.safety import NESTED_TOO_DEEPLY, JSONTooDeep, parse_json

if TYPE_CHECKING:
    from api.direct import Disconnected
    from api.state import AppState


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


async def live_rows(
    state: AppState,
    capability: str,
    payload: dict[str, Any],
    count: int,
    disconnected: Disconnected | None,
) -> tuple[list[Any], int]:
    """The worker's rows for a live request of ``count`` inputs, and the tokens it used."""
    reply = await state.live.call(capability, payload, disconnected=disconnected)
    rows = orjson.loads(reply.body)
    if not isinstance(rows, list) or len(rows) != count:
        raise InternalError.for_request(None)
    return rows, int((reply.header.get("usage") or {}).get("prompt_tokens", 0))
