"""The one exception hierarchy. ``api/errors.py`` maps it to HTTP in OpenAI's shape.

Workers raise these too; they travel to the API as ``to_wire()`` dicts and come back as
the same class through ``from_wire()``.
"""

from __future__ import annotations

from typing import Any, ClassVar


class LanewayError(Exception):
    status_code: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code

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


class Conflict(LanewayError):
    status_code = 409
    error_type = "invalid_request_error"


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


class ClientGone(LanewayError):
    status_code = 499
    error_type = "client_closed_request"


class ServiceUnavailable(LanewayError):
    status_code = 503
    error_type = "service_unavailable"
    default_code = "model_not_ready"


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
