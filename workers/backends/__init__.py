"""Model backends: one interface (``base.ModelBackend``), one class per family."""

from __future__ import annotations

import importlib

from configs.catalog import CatalogEntry
from workers.backends.base import ModelBackend


def backend_class(entry: CatalogEntry) -> type[ModelBackend]:
    module_name, _, class_name = entry.backend.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, ModelBackend)):
        raise TypeError(f"{entry.backend} is not a ModelBackend")
    return cls


__all__ = ["ModelBackend", "backend_class"]
