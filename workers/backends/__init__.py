"""Model backends: one interface (``base.ModelBackend``), one class per family."""

from __future__ import annotations

import importlib
from typing import TypeVar

from configs.catalog import CatalogEntry
from configs.settings import Settings
from workers.backends.base import ModelBackend

B = TypeVar("B", bound=ModelBackend)


def backend_class(entry: CatalogEntry) -> type[ModelBackend]:
    module_name, _, class_name = entry.backend.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, ModelBackend)):
        raise TypeError(f"{entry.backend} is not a ModelBackend")
    return cls


def load_backend(entry: CatalogEntry, settings: Settings, *, device: str, kind: type[B]) -> B:
    """The entry's backend, loaded on ``device`` and warmed up; a ``kind`` (the interface
    its capability's engine drives) or a ``TypeError``."""
    path = entry.resolve_path(auto_download=settings.auto_download)
    backend = backend_class(entry)(entry, device=device, model_path=path)
    if not isinstance(backend, kind):
        raise TypeError(f"{entry.backend} is not a {kind.__name__}")
    backend.load()
    backend.warmup()
    return backend


__all__ = ["ModelBackend", "backend_class", "load_backend"]
