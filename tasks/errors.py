"""The one exception hierarchy, the one OpenAI error body, the one validation translator.

``api/errors.py`` maps the hierarchy to HTTP. Workers raise these too; they travel to the
API as ``to_wire()`` dicts and come back as the same class through ``from_wire()``. Batch
output lines carry ``exc.body()``, the same body the live route would have answered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

# how much of a client's value an error message may quote (a 1 MB model name must not
# come back as a 1 MB message)
QUOTE_MAX = 80


def quote(value: object, limit: int = QUOTE_MAX) -> str:
    """``repr(value)`` cut to ``limit`` characters: safe to put in a message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + "...'"


def error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error shape: the only place it is written."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class LanewayError(Exception):
    status_code: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)

    def to_wire(self) -> dict[str, Any]:
        return {
            "kind": type(self).__name__,
            "message": self.message,
            "param": self.param,
            "code": self.code,
        }

    @staticmethod
    def from_wire(data: dict[str, Any]) -> LanewayError:
        cls = _REGISTRY.get(str(data.get("kind")), LanewayError)
        return cls(str(data.get("message", "")), param=data.get("param"), code=data.get("code"))


class InternalError(LanewayError):
    """Something broke that is not the caller's fault. The message names only the request
    id; the detail goes to the log of whoever caught it."""

    @classmethod
    def for_request(cls, request_id: str | None) -> InternalError:
        suffix = f" (request id {request_id})" if request_id else ""
        return cls(
            "The server had an error while processing your request"
            f"{suffix}. Retry it, or report the request id if the error persists."
        )


class InvalidRequest(LanewayError):
    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    default_code = "context_length_exceeded"


class AuthenticationFailed(LanewayError):
    status_code = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"


class NotFound(LanewayError):
    status_code = 404
    error_type = "invalid_request_error"


class ModelNotFound(NotFound):
    default_code = "model_not_found"


class PayloadTooLarge(LanewayError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"


class QueueFull(LanewayError):
    status_code = 429
    error_type = "rate_limit_error"
    default_code = "queue_full"

    def __init__(self, message: str, *, retry_after: int = 1, **kw: Any):
        super().__init__(message, **kw)
        self.retry_after = retry_after


class RateLimited(QueueFull):
    """A key over its requests or tokens per minute (api/limits.py)."""

    default_code = "rate_limit_exceeded"


class ClientGone(LanewayError):
    status_code = 499
    error_type = "client_closed_request"


class ServiceUnavailable(LanewayError):
    status_code = 503
    error_type = "service_unavailable"
    default_code = "model_not_ready"


class StorageFull(ServiceUnavailable):
    """The file store has no space left (ENOSPC, EDQUOT). Temporary: the operator frees
    space, and the same request then succeeds; nothing was kept of the failed write."""

    default_code = "storage_full"


class DatabaseUnavailable(ServiceUnavailable):
    """The database cannot be reached (down, restarting, cut off): the batch and file
    routes answer this, with ``Retry-After``; live routes never need the database."""

    default_code = "database_unavailable"
    retry_after: ClassVar[int] = 5

    def __init__(
        self, message: str = "The database is unavailable; retry shortly.", **kw: Any
    ) -> None:
        super().__init__(message, **kw)


class GatewayTimeout(LanewayError):
    status_code = 504
    error_type = "timeout"
    default_code = "timeout"


def _subclasses(cls: type[LanewayError]) -> list[type[LanewayError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_subclasses(sub))
    return out


_REGISTRY: dict[str, type[LanewayError]] = {c.__name__: c for c in _subclasses(LanewayError)}


# -- validation errors -----------------------------------------------------------------------

# where FastAPI says a value came from: the first element of its errors' locations, not
# part of the parameter's name (``unsourced`` drops it)
_SOURCES = ("body", "query", "path", "header", "cookie")


def unsourced(errors: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """FastAPI's validation errors with the source (``body``, ...) cut from each location,
    as pydantic gives them for a model: a field may itself be called ``query``."""
    out = []
    for error in errors:
        loc = tuple(error.get("loc", ()))
        out.append({**error, "loc": loc[1:] if loc and loc[0] in _SOURCES else loc})
    return out


def invalid_request(
    errors: Sequence[Mapping[str, Any]], hints: Mapping[str, str] | None = None
) -> InvalidRequest:
    """The one translation of pydantic (or FastAPI) validation errors into a message.

    Live routes (``RequestValidationError``) and Batch API lines (``ValidationError``)
    both come here, so the same bad request gets the same message in both."""
    if not errors:
        return InvalidRequest("Invalid request body.")
    first = errors[0]
    kind = first.get("type")
    if kind == "json_invalid":
        return InvalidRequest(
            "We could not parse the JSON body of your request: it is not valid JSON."
        )
    loc = [str(p) for p in first.get("loc", ())]
    # the request must be an object: pydantic says so at the top level
    if not loc and kind in ("model_type", "model_attributes_type", "dict_type"):
        return InvalidRequest("The request body must be a JSON object.")
    param = loc[0] if loc else None
    if kind == "missing":
        if param is None:
            return InvalidRequest("The request body is empty; send a JSON object.")
        return InvalidRequest(f"Missing required parameter: '{param}'.", param=param)
    # a contract's own words for a field (a union's members would each give one error)
    if hints and param is not None and param in hints:
        return InvalidRequest(hints[param], param=param)
    where = f"'{'.'.join(loc)}'" if loc else "the body"
    return InvalidRequest(f"Invalid value for {where}: {first.get('msg', 'invalid')}", param=param)
