"""The OpenAPI document, made to describe what the API really does.

FastAPI documents a 422 validation error on every route with parameters; laneway never
answers 422 (validation errors are 400 in OpenAI's shape, documented per route with
``error_responses``), so those entries and their schemas go. With an API key configured,
the document declares the bearer scheme on every route the key protects.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from api.middleware import is_protected
from configs.settings import Settings

_FASTAPI_422 = ("HTTPValidationError", "ValidationError")


def document(app: FastAPI, settings: Settings) -> dict[str, Any]:
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    for path, operations in schema.get("paths", {}).items():
        protected = settings.api_key and is_protected(path, protect_ops=settings.protect_ops)
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
            if protected:
                operation["security"] = [{"bearer": []}]
    components = schema.setdefault("components", {})
    for name in _FASTAPI_422:
        components.get("schemas", {}).pop(name, None)
    if settings.api_key:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return schema


def install(app: FastAPI, settings: Settings) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document(app, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
