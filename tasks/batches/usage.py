"""A batch's usage in the database: one row per (chunk, unit), summed by unit.

A chunk's fenced commit (``tasks/batches/chunks.py``) inserts its chunk's rows in the
same transaction as the move to ``done``, so only the run that owns the chunk writes
them, and only once (they are keyed by chunk and unit). Concurrent commits of different
chunks insert different rows and update none, so no commit can lose another's usage on
any isolation level; the batch's usage is read as ``SUM`` grouped by unit. Units are
whatever the lines' ``Usage`` records name: a new one needs no column.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from tasks.store.models import UsageRow
from tasks.store.usage import Amount, Usage


def record_chunk_usage(session: Session, batch_id: str, chunk_index: int, usage: Usage) -> None:
    """Add a committed chunk's rows (call it in the chunk's fenced commit)."""
    rows = [
        {
            "batch_id": batch_id,
            "chunk_index": chunk_index,
            "unit": unit,
            "count": amount if isinstance(amount, int) else None,
            "measure": amount if isinstance(amount, float) else None,
        }
        for unit, amount in usage.items()
    ]
    if rows:
        session.execute(insert(UsageRow), rows)


def batch_usages(session: Session, batch_ids: Iterable[str]) -> dict[str, Usage]:
    """The usage of each batch (Usage() for one with none), in one query."""
    ids = list(dict.fromkeys(batch_ids))
    amounts: dict[str, dict[str, Amount]] = defaultdict(dict)
    if ids:
        for batch_id, unit, count, measure in session.execute(
            select(
                UsageRow.batch_id,
                UsageRow.unit,
                func.sum(UsageRow.count),
                func.sum(UsageRow.measure),
            )
            .where(UsageRow.batch_id.in_(ids))
            .group_by(UsageRow.batch_id, UsageRow.unit)
        ):
            amounts[batch_id][unit] = _amount(count, measure)
    return {batch_id: Usage.from_dict(amounts.get(batch_id, {})) for batch_id in ids}


def batch_usage(session: Session, batch_id: str) -> Usage:
    return batch_usages(session, [batch_id])[batch_id]


def _amount(count: Any, measure: Any) -> Amount:
    """A unit's sum: an int while every row counted it, else a float (Postgres sums
    integers as numeric: Decimal)."""
    whole = int(count) if count is not None else 0
    return whole if measure is None else float(measure) + whole
