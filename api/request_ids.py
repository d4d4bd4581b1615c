"""Request ids: taken from the caller's ``X-Request-ID`` when it is safe to repeat, else
made here; returned in the response's ``X-Request-ID``, put in every log record of the
request (``configs.logs.REQUEST_ID``) and carried in live tasks to the worker's log.

A caller's id is used only when it is 1 to ``MAX_LENGTH`` characters of letters, digits
and ``-_.:/+=``: anything else (control characters, a 10 KB value, non-ASCII) is
replaced, never echoed into a header or a log.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping

HEADER = b"x-request-id"
MAX_LENGTH = 128
_SAFE = re.compile(rb"[A-Za-z0-9._:/+=-]{1,%d}" % MAX_LENGTH)


def new_request_id() -> str:
    return f"req_{uuid.uuid4().hex}"


def request_id_of(headers: Mapping[bytes, bytes]) -> str:
    """The caller's id when it is safe, else a new one."""
    given = headers.get(HEADER)
    if given is not None and _SAFE.fullmatch(given):
        return given.decode("ascii")
    return new_request_id()
