"""The OpenAPI document, made to describe what the API really does.

FastAPI documents a 422 validation error on every route with parameters; laneway never
answers 422 (validation errors are 400 in OpenAI's shape, documented per route with
``error_responses``), so those entries and their schemas go. With an API key configured,
the document declares the bearer scheme on every route the key protects.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from api.middleware import is_protected
from configs.settings import Settings

_FASTAPI_422 = ("HTTPValidationError", "ValidationError")
_DEFS_REF = "#/$defs/"
_COMPONENTS_REF = "#/components/schemas/"


def document(app: FastAPI, settings: Settings) -> dict[str, Any]:
    # a deep copy: routes' ``openapi_extra`` dicts end up in the document by reference
    schema = copy.deepcopy(
        get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
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
    _lift_defs(schema.get("paths", {}), components.setdefault("schemas", {}))
    if settings.api_key:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return schema


def _lift_defs(node: Any, schemas: dict[str, Any]) -> None:
    """Move every inline ``$defs`` under ``node`` into ``schemas`` and point the
    ``#/$defs/<name>`` references at ``#/components/schemas/<name>`` (in place)."""
    if isinstance(node, list):
        for item in node:
            _lift_defs(item, schemas)
        return
    if not isinstance(node, dict):
        return
    for name, definition in node.pop("$defs", {}).items():
        _lift_defs(definition, schemas)
        if schemas.setdefault(name, definition) != definition:
            raise ValueError(f"two different schemas are both named {name!r}")
    if "$ref" in node:
        node["$ref"] = _component_ref(node["$ref"])
    discriminator = node.get("discriminator")
    if isinstance(discriminator, dict) and isinstance(discriminator.get("mapping"), dict):
        mapping = discriminator["mapping"]
        for key, ref in mapping.items():
            mapping[key] = _component_ref(ref)
    for value in node.values():
        _lift_defs(value, schemas)


def _component_ref(ref: Any) -> Any:
    if isinstance(ref, str) and ref.startswith(_DEFS_REF):
        return _COMPONENTS_REF + ref.removeprefix(_DEFS_REF)
    return ref


def install(app: FastAPI, settings: Settings) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document(app, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
