"""The rows of ``benchmark_records``: added by ``laneway benchmark`` (an operator action:
the REST API only reads them) and folded into by workers (``fold_rolling``)."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tasks.store.models import BenchmarkRow

BENCHMARK = "benchmark"
ROLLING = "rolling"
# a sample response is kept to show what the model answered, not to store answers
MAX_SAMPLE_CHARS = 2000
# how much one heartbeat's rate moves a rolling record (an exponential moving average)
ROLLING_WEIGHT = 0.3


@cache
def laneway_version() -> str:
    """The installed laneway's version (from its metadata: the API imports nothing of the
    ``laneway`` CLI package)."""
    try:
        return version("laneway")
    except PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class Measured:
    """One row of a benchmark run: a model at one concurrency."""

    model: str
    capability: str
    engine: str
    device: str
    workers: int
    concurrency: int
    requests: int
    success_rate: float
    requests_per_s: float | None = None
    units_per_s: float | None = None
    unit: str | None = None
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None
    ttft_p50_s: float | None = None
    batch_size: float | None = None
    context_length: int | None = None
    input_tokens: float | None = None
    output_tokens: float | None = None
    sample_response: str | None = None


def add_run(session: Session, rows: Sequence[Measured], *, now: float | None = None) -> str:
    """Store one benchmark run's rows under a new run id (returned)."""
    run_id = f"run_{uuid.uuid4().hex[:24]}"
    at = int(now if now is not None else time.time())
    for row in rows:
        values = asdict(row)
        sample = values.pop("sample_response")
        session.add(
            BenchmarkRow(
                source=BENCHMARK,
                run_id=run_id,
                sample_response=sample[:MAX_SAMPLE_CHARS] if sample is not None else None,
                version=laneway_version(),
                created_at=at,
                updated_at=at,
                **values,
            )
        )
    session.flush()
    return run_id


@dataclass(frozen=True)
class Sample:
    """A worker's rates over one interval, for ``fold_rolling``."""

    model: str
    capability: str
    engine: str
    device: str
    requests_per_s: float | None
    units_per_s: float | None
    unit: str | None
    batch_size: float | None
    context_length: int | None = None


def rolling_key(model: str, engine: str, device: str) -> str:
    return hashlib.sha256(f"{model}\0{engine}\0{device}".encode()).hexdigest()


def fold_rolling(session: Session, sample: Sample, *, now: float | None = None) -> None:
    """Move the rolling record of ``sample``'s model, engine and device toward its rates.

    One ``UPDATE`` computes the moving average in SQL, so workers folding into the same
    row at once each count (no read-modify-write); the first fold inserts the row, and a
    concurrent first insert that loses the race folds instead."""
    at = int(now if now is not None else time.time())
    key = rolling_key(sample.model, sample.engine, sample.device)
    if _fold(session, key, sample, at):
        return
    try:
        with session.begin_nested():
            session.add(
                BenchmarkRow(
                    source=ROLLING,
                    run_id=ROLLING,
                    rolling_key=key,
                    model=sample.model,
                    capability=sample.capability,
                    engine=sample.engine,
                    device=sample.device,
                    workers=1,
                    context_length=sample.context_length,
                    batch_size=sample.batch_size,
                    requests_per_s=sample.requests_per_s,
                    units_per_s=sample.units_per_s,
                    unit=sample.unit,
                    requests=0,
                    version=laneway_version(),
                    created_at=at,
                    updated_at=at,
                )
            )
    except IntegrityError:
        _fold(session, key, sample, at)


def _fold(session: Session, key: str, sample: Sample, at: int) -> bool:
    """The moving-average update of the row ``key``: whether there was one."""
    values: dict[str, Any] = {"updated_at": at, "version": laneway_version()}
    for name in ("requests_per_s", "units_per_s", "batch_size"):
        new = getattr(sample, name)
        if new is not None:
            column = getattr(BenchmarkRow, name)
            values[name] = func.coalesce(column * (1 - ROLLING_WEIGHT) + new * ROLLING_WEIGHT, new)
    if sample.unit is not None:
        values["unit"] = sample.unit
    result = session.execute(
        update(BenchmarkRow).where(BenchmarkRow.rolling_key == key).values(**values)
    )
    return bool(getattr(result, "rowcount", 0))


def for_model(session: Session, model: str, *, limit: int) -> list[BenchmarkRow]:
    """``model``'s records, newest first (a rolling row by its last fold)."""
    return list(
        session.scalars(
            select(BenchmarkRow)
            .where(BenchmarkRow.model == model)
            .order_by(BenchmarkRow.updated_at.desc(), BenchmarkRow.id.desc())
            .limit(limit)
        )
    )


def for_models(session: Session, models: Iterable[str]) -> dict[str, list[BenchmarkRow]]:
    """Each of ``models``' rolling rows and the rows of its latest benchmark run."""
    wanted = sorted(set(models))
    out: dict[str, list[BenchmarkRow]] = {m: [] for m in wanted}
    if not wanted:
        return out
    latest = (
        select(BenchmarkRow.model, func.max(BenchmarkRow.created_at).label("at"))
        .where(BenchmarkRow.source == BENCHMARK, BenchmarkRow.model.in_(wanted))
        .group_by(BenchmarkRow.model)
        .subquery()
    )
    runs = select(BenchmarkRow.run_id).join(
        latest,
        (BenchmarkRow.model == latest.c.model) & (BenchmarkRow.created_at == latest.c.at),
    )
    query = select(BenchmarkRow).where(
        BenchmarkRow.model.in_(wanted),
        (BenchmarkRow.source == ROLLING) | BenchmarkRow.run_id.in_(runs),
    )
    for row in session.scalars(query.order_by(BenchmarkRow.id)):
        out[row.model].append(row)
    return out


def models(session: Session) -> list[str]:
    """Every model with a record, sorted."""
    return list(session.scalars(select(BenchmarkRow.model).distinct().order_by(BenchmarkRow.model)))


def public(row: BenchmarkRow) -> dict[str, Any]:
    """A record as ``/v1/benchmarks`` shows it."""
    out: dict[str, Any] = {"object": "benchmark.record"}
    for column in _PUBLIC:
        out[column] = getattr(row, column)
    out["measured_at"] = out.pop("updated_at")
    return out


_PUBLIC = (
    "id",
    "source",
    "run_id",
    *(f.name for f in fields(Measured)),
    "version",
    "created_at",
    "updated_at",
)
