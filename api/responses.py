"""JSON responses that cannot fail on the way out.

Starlette's JSONResponse encodes with ``ensure_ascii=False`` and then UTF-8, which raises
on a lone surrogate: one such string anywhere in a body would turn any answer into a
500. Input is checked at the edges, and this is the backstop: such a body is sent with
ASCII escapes instead (still valid JSON).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from starlette.responses import JSONResponse, Response


def dumps(content: Any) -> bytes:
    try:
        return json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


class SafeJSONResponse(JSONResponse):
    """The app's default response class."""

    def render(self, content: Any) -> bytes:
        return dumps(content)


def json_response(
    content: Any, *, status_code: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(
        dumps(content),
        status_code=status_code,
        headers=dict(headers or {}),
        media_type="application/json",
    )
