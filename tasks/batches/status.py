"""The batch status machine: the legal moves, the one function that makes them, and the
fenced lease a validator or finaliser holds while it works.

::

    validating ──> in_progress ──> finalizing ──> completed
        │  │            │  │
        │  └─> failed   │  └─> expired      (past completion_window)
        └──────────> cancelling ──> cancelled

    and from in_progress, finalizing or cancelling to failed: the job that status needs
    (a finalisation) broke ``LANEWAY_CHUNK_MAX_ATTEMPTS`` times (lifecycle.give_up), or
    a chunk could not write its results to a full file store in as many tries
    (chunks.py: the batch fails with ``storage_full``)

Validation and finalisation are claimed with a lease: ``claim()`` writes a fresh
``lease_token`` and ``lease_until``; the holder renews ``lease_until`` while it works
(``renew()``, from a heartbeat thread) and makes its final move with ``transition(...,
fence=token)``. Someone whose lease ran out may find the work claimed by another; every
write it would still make carries its token, so it changes nothing. A finaliser's final
move keeps its lease while it removes the chunk parts, then ``release()``s it
(``tasks/batches/leftovers.py``).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from tasks.store.models import BatchRow

OPEN_STATUSES = ("validating", "in_progress", "finalizing", "cancelling")
LEGAL: dict[str, set[str]] = {
    "validating": {"in_progress", "failed", "cancelling", "expired"},
    "in_progress": {"finalizing", "cancelling", "expired", "failed"},
    "finalizing": {"completed", "failed"},
    "cancelling": {"cancelled", "failed"},
}
TIMESTAMP_FIELD = {
    "in_progress": "in_progress_at",
    "finalizing": "finalizing_at",
    "completed": "completed_at",
    "failed": "failed_at",
    "expired": "expired_at",
    "cancelling": "cancelling_at",
    "cancelled": "cancelled_at",
}
# where a batch ends: the statuses with no move out of them
FINISHED_STATUSES = tuple(to for to in TIMESTAMP_FIELD if to not in LEGAL)


def now() -> float:
    return time.time()


def transition(
    session: Session, batch_id: str, to: str, *, fence: str | None = None, **values: Any
) -> bool:
    """The one way a batch changes status: compare-and-set from a legal source status.

    With ``fence``, only while that lease token is still the batch's. Every move ends
    whatever claim was on the batch (its lease is cleared), so a validator still at work
    on a batch that was cancelled stops renewing, and the next step can be claimed at
    once, and the count of its job's attempts starts again. Returns False (and changes
    nothing) when the batch is not in a status that may move to ``to`` or the fence does
    not hold; raises ValueError for an unknown status.
    """
    if to not in TIMESTAMP_FIELD:
        raise ValueError(f"unknown batch status {to!r}")
    sources = [src for src, targets in LEGAL.items() if to in targets]
    where = [BatchRow.id == batch_id, BatchRow.status.in_(sources)]
    if fence is not None:
        where.append(BatchRow.lease_token == fence)
    values.setdefault("lease_until", None)
    values.setdefault("lease_token", None)
    values.setdefault("job_attempts", 0)
    result = session.execute(
        update(BatchRow)
        .where(*where)
        .values(status=to, **{TIMESTAMP_FIELD[to]: int(time.time())}, **values)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def claim(session: Session, batch_id: str, status: str, lease_s: float) -> tuple[str, int] | None:
    """Take the batch's lease for the work its ``status`` needs (validation, finalisation
    or, once finished, the cleanup); returns the new token and how many claims that work
    has had (this one included), or None while someone else holds it."""
    t = now()
    token = uuid.uuid4().hex
    result = session.execute(
        update(BatchRow)
        .where(
            BatchRow.id == batch_id,
            BatchRow.status == status,
            (BatchRow.lease_until.is_(None)) | (BatchRow.lease_until < t),
        )
        .values(lease_until=t + lease_s, lease_token=token, job_attempts=BatchRow.job_attempts + 1)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return None
    attempts = session.scalar(select(BatchRow.job_attempts).where(BatchRow.id == batch_id))
    return token, int(attempts or 1)


def renew(session: Session, batch_id: str, token: str, lease_s: float) -> bool:
    """Push the lease out while its holder works; False once the token is not ours."""
    result = session.execute(
        update(BatchRow)
        .where(BatchRow.id == batch_id, BatchRow.lease_token == token)
        .values(lease_until=now() + lease_s)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def release(session: Session, batch_id: str, token: str) -> bool:
    """End the lease ``token`` holds, leaving the status as it is (a finished batch's
    cleanup lease, once the cleanup is done); False when the token is not ours."""
    result = session.execute(
        update(BatchRow)
        .where(BatchRow.id == batch_id, BatchRow.lease_token == token)
        .values(lease_until=None, lease_token=None)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]
