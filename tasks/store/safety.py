"""What a stored or echoed string must be: bounded, without NUL, valid Unicode.

Postgres refuses NUL in text and strings longer than their column; a lone surrogate (JSON
``"\\ud800"``) cannot be encoded as UTF-8 on the way back out. Each would be a 500 (and, for
an upload, an orphaned blob) if it reached the database, so the edges check them first.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

from tasks.errors import InvalidRequest

# every id laneway makes (file-…, batch_…) fits this; anything else cannot exist
_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def is_id(value: object) -> bool:
    """Could ``value`` be one of our ids? (Safe to look up on any database.)"""
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def text_problem(value: str, max_chars: int) -> str | None:
    """Why ``value`` cannot be stored, or None."""
    if len(value) > max_chars:
        return f"is longer than {max_chars} characters"
    if "\x00" in value:
        return "contains a NUL character"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode text (it holds a lone surrogate)"
    return None


def check_text(value: str, *, param: str, max_chars: int) -> str:
    problem = text_problem(value, max_chars)
    if problem is not None:
        raise InvalidRequest(f"'{param}' {problem}", param=param)
    return value


MAX_IDEMPOTENCY_KEY = 256  # the column's length


def check_idempotency_key(key: str | None) -> str | None:
    """The ``Idempotency-Key`` header as it will be stored (None when absent or empty)."""
    if not key:
        return None
    return check_text(key, param="Idempotency-Key", max_chars=MAX_IDEMPOTENCY_KEY)


# -- JSON from a client -------------------------------------------------------------------


class JSONTooDeep(ValueError):
    """Nested deeper than the parsers take (orjson: 1024 levels)."""


# completes "We could not parse ...: " and "the line ...: "
NESTED_TOO_DEEPLY = "it is nested too deeply (at most 1024 levels of arrays and objects)"


def parse_json(raw: bytes) -> tuple[Any, bool]:
    """A client's JSON (a live body or a Batch API line), and whether orjson (strict
    UTF-8) parsed it. The standard parser is the fallback, as it also takes lone
    surrogates (which the contracts then refuse by name), but never for input nested
    past orjson's limit: the standard parser recurses on the C stack and raises
    ``RecursionError`` (a 500, or a batch validation that crashes on every retry).
    Raises ``JSONTooDeep`` for that, ``UnicodeDecodeError`` for bytes that are not UTF-8
    and ``ValueError`` for anything else that is not JSON."""
    try:
        return orjson.loads(raw), True
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc) or "recursion" in str(exc).lower():
            raise JSONTooDeep(NESTED_TOO_DEEPLY) from None
    try:
        return json.loads(raw), False
    except RecursionError:  # nested past the stack: orjson said so above, or it differs
        raise JSONTooDeep(NESTED_TOO_DEEPLY) from None
