"""/v1/benchmarks: reading records and estimating, in a worker thread (database, file
store). Records are written by ``laneway benchmark`` and by workers, never here."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy.orm import Session

from configs.catalog import Catalog
from configs.settings import Settings
from tasks.access.tenancy import Owner
from tasks.benchmarks import records
from tasks.benchmarks.service import Shape, basis, estimate, file_shape, rates_of
from tasks.errors import ModelNotFound, quote
from tasks.filestore import get_file_store
from tasks.store.db import session_scope
from tasks.store.files import get_file
from tasks.store.safety import text_problem

Workers = Mapping[str, int] | None
# the longest model id a record holds (its column)
MODEL_CHARS = 256


def known_model(catalog: Catalog, served: list[str], model: str) -> str:
    """The catalog id of a served ``model`` (by id or alias), else ``model`` itself when
    it has records (a model served before); 404 otherwise."""
    entry = catalog.find(model)
    if entry is not None and entry.id in served:
        return entry.id
    if text_problem(model, MODEL_CHARS) is None:  # else no record can name it
        with session_scope() as s:
            if records.for_model(s, model, limit=1):
                return model
    raise ModelNotFound(
        f"The model {quote(model)} is not served here and has no benchmark records",
        param="model",
    )


def models(served: Sequence[str], workers: Workers) -> dict[str, Any]:
    """Every model with records, and every served model."""
    with session_scope() as s:
        names = sorted({*records.models(s), *served})
        return {"object": "list", "data": _cards(s, names, served, workers)}


def compare(names: Sequence[str], served: Sequence[str], workers: Workers) -> dict[str, Any]:
    """The named models' cards, in the order asked."""
    with session_scope() as s:
        return {"object": "list", "data": _cards(s, names, served, workers)}


def _cards(
    s: Session, names: Sequence[str], served: Sequence[str], workers: Workers
) -> list[dict[str, Any]]:
    found = records.for_models(s, names)
    chosen = rates_of(found, workers)  # from the rows just read, not a second query
    return [
        {
            "object": "benchmark.model",
            "id": name,
            "served": name in served,
            "basis": basis(chosen[name]),
            "records": [records.public(r) for r in found[name]],
        }
        for name in names
    ]


def model_records(model: str, limit: int) -> dict[str, Any]:
    with session_scope() as s:
        return {
            "object": "list",
            "data": [records.public(r) for r in records.for_model(s, model, limit=limit)],
        }


def estimate_lines(shape: Shape, workers: Workers) -> dict[str, Any]:
    with session_scope() as s:
        return estimate(s, shape, workers=workers)


def estimate_file(
    settings: Settings, catalog: Catalog, file_id: str, owner: Owner, workers: Workers
) -> dict[str, Any]:
    """The estimate of an uploaded batch input file (the caller's: 404 otherwise)."""
    with session_scope() as s:
        row = get_file(s, file_id, owner=owner)
    shape = file_shape(
        row, get_file_store(settings), catalog, max_line=settings.max_batch_line_bytes
    )
    entry = catalog.find(shape.model)
    if entry is None or entry.id not in settings.models:
        raise ModelNotFound(
            f"The model {quote(shape.model)} named by file {file_id} is not served here",
            param="input_file_id",
        )
    with session_scope() as s:
        return estimate(s, dataclasses.replace(shape, model=entry.id), workers=workers)
