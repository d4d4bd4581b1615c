"""Estimates from the database: the rates of models (their records), the work queued
ahead of a batch, a running batch's completion time, and the shape of an input file."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from configs.capabilities import REGISTRY
from configs.catalog import Catalog
from tasks.batches.validation import bounded_lines
from tasks.benchmarks import records
from tasks.benchmarks.estimate import Progress, Rate, choose, completion_at, seconds_for
from tasks.errors import InvalidRequest
from tasks.filestore import FileStore
from tasks.store.models import BatchRow, BenchmarkRow, FileRow
from tasks.store.safety import parse_json

# batches whose lines are still to run: what is queued ahead of a new one
ACTIVE = ("validating", "in_progress")
# an input file's shape is read from its first bytes (at most this many), its line count
# scaled from them by its size: an estimate must not read a 200 MB file
SHAPE_SAMPLE_BYTES = 4 * 1024 * 1024
# output lengths a line may ask for, by field name (the first one found counts)
OUTPUT_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")


def rates(
    session: Session, models: Iterable[str], workers: Mapping[str, int] | None = None
) -> dict[str, Rate | None]:
    """The rate each model's estimates go by (``estimate.choose``); ``workers``: the
    warm workers serving each model now."""
    return rates_of(records.for_models(session, models), workers)


def rates_of(
    rows: Mapping[str, Sequence[BenchmarkRow]], workers: Mapping[str, int] | None = None
) -> dict[str, Rate | None]:
    """``rates`` from each model's rows already read (``records.for_models``)."""
    counts = workers or {}
    return {m: choose(found, workers=counts.get(m)) for m, found in rows.items()}


@dataclass(frozen=True)
class Queued:
    """A batch with lines still to run, in the order the lanes take them."""

    created_at: int
    batch_id: str
    remaining: int


def queued(session: Session, models: Iterable[str]) -> dict[str, list[Queued]]:
    """The active batches of each of ``models``, oldest first, whoever owns them (what is
    ahead of a batch is everyone's work; only its size is told)."""
    wanted = sorted(set(models))
    out: dict[str, list[Queued]] = {m: [] for m in wanted}
    if not wanted:
        return out
    query = select(
        BatchRow.model,
        BatchRow.created_at,
        BatchRow.id,
        BatchRow.request_total,
        BatchRow.request_completed,
        BatchRow.request_failed,
    ).where(BatchRow.status.in_(ACTIVE), BatchRow.model.in_(wanted))
    for model, created, bid, total, done, failed in session.execute(query):
        out[str(model)].append(Queued(created, bid, max(total - done - failed, 0)))
    for found in out.values():
        found.sort(key=lambda q: (q.created_at, q.batch_id))
    return out


def lines_ahead(queue: list[Queued], created_at: int, batch_id: str) -> int:
    return sum(q.remaining for q in queue if (q.created_at, q.batch_id) < (created_at, batch_id))


def completions(
    session: Session,
    rows: list[BatchRow],
    *,
    workers: Mapping[str, int] | None = None,
    now: float | None = None,
) -> dict[str, int | None]:
    """Each active batch's estimated completion time (unix seconds; None when unknown)."""
    active = [r for r in rows if r.status in ACTIVE and r.model]
    if not active:
        return {}
    models = {str(r.model) for r in active}
    by_model, queues = rates(session, models, workers), queued(session, models)
    at = time.time() if now is None else now
    out: dict[str, int | None] = {}
    for row in active:
        model = str(row.model)
        rate = by_model[model]
        done = row.request_completed + row.request_failed
        ahead = lines_ahead(queues[model], row.created_at, row.id)
        out[row.id] = completion_at(
            Progress(row.status, row.request_total, done, row.in_progress_at),
            now=at,
            prior_s=seconds_for(rate, max(row.request_total - done, 0)),
            ahead_s=seconds_for(rate, ahead) or 0.0,
        )
    return out


@dataclass(frozen=True)
class Shape:
    """What an estimate needs of some lines: the model, how many, their mean size."""

    model: str
    lines: int
    input_tokens: float | None = None
    output_tokens: float | None = None


def estimate(
    session: Session, shape: Shape, *, workers: Mapping[str, int] | None = None
) -> dict[str, Any]:
    """The ``/v1/benchmarks/estimate`` object: seconds to run ``shape``'s lines after
    the work queued ahead of them, and the record it goes by."""
    rate = rates(session, [shape.model], workers)[shape.model]
    ahead = sum(q.remaining for q in queued(session, [shape.model])[shape.model])
    sizes = {"input_tokens": shape.input_tokens, "output_tokens": shape.output_tokens}
    own = seconds_for(rate, shape.lines, **sizes)
    before = seconds_for(rate, ahead)
    return {
        "object": "benchmark.estimate",
        "model": shape.model,
        "lines": shape.lines,
        **sizes,
        "queued_ahead_lines": ahead,
        "queued_ahead_seconds": before,
        "run_seconds": own,
        "seconds": own + before if own is not None and before is not None else None,
        "basis": basis(rate),
    }


def basis(rate: Rate | None) -> dict[str, Any] | None:
    if rate is None:
        return None
    return {
        "source": rate.source,
        "requests_per_s": rate.requests_per_s,
        "units_per_s": rate.units_per_s,
        "unit": rate.unit,
        "measured_at": rate.measured_at,
        "record_ids": list(rate.record_ids),
    }


def file_shape(row: FileRow, store: FileStore, catalog: Catalog, *, max_line: int) -> Shape:
    """The shape of a batch input file: its model (the first line's), its line count
    (scaled from the first ``SHAPE_SAMPLE_BYTES`` by its size) and mean sizes (the
    capability's token estimate of each sampled line's body)."""
    if row.purpose != "batch":
        raise InvalidRequest(
            f"file {row.id} has purpose {row.purpose!r}, not 'batch'", param="input_file_id"
        )
    model: str | None = None
    lines = read = inputs = outputs = 0
    with store.open(row.storage_key) as f:
        for raw, size in bounded_lines(f, max_line):
            read += size
            if raw is None or not raw.strip():
                continue
            body = _body(raw)
            model = model or (str(body.get("model")) if body.get("model") else None)
            entry = catalog.find(model) if model else None
            if entry is not None:
                hook = REGISTRY[entry.capability].contract_module().estimate_tokens
                out = _output_tokens(body)
                outputs += out
                inputs += max(hook(body) - out * _choices(body), 0)
            lines += 1
            if read >= SHAPE_SAMPLE_BYTES:
                break
    if model is None or lines == 0 or catalog.find(model) is None:
        raise InvalidRequest(
            f"file {row.id} names no served model in its first lines", param="input_file_id"
        )
    scaled = round(lines * row.bytes / read) if read < row.bytes else lines
    return Shape(model, max(scaled, lines), inputs / lines, outputs / lines)


def _body(raw: bytes) -> dict[str, Any]:
    try:
        line, _ = parse_json(raw)
    except ValueError:
        return {}
    body = line.get("body") if isinstance(line, dict) else None
    return body if isinstance(body, dict) else {}


def _output_tokens(body: Mapping[str, Any]) -> int:
    for name in OUTPUT_FIELDS:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0


def _choices(body: Mapping[str, Any]) -> int:
    n = body.get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
