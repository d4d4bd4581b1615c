"""What the API asks of batches: create, retrieve, list, cancel, and the batch object.

Everything here is short database work; the heavy lifting (validation, chunks,
finalisation) happens in the workers, which ``notify`` wakes.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from configs.settings import Settings
from tasks.access.quotas import Quota, check_lines_room, check_open_batches, lock_owner
from tasks.access.tenancy import Owner, owned_by, scoped_idempotency_key
from tasks.batches.endpoints import BATCH_ENDPOINTS
from tasks.batches.status import FINISHED_STATUSES, OPEN_STATUSES, transition
from tasks.batches.usage import batch_usage, batch_usages
from tasks.benchmarks.service import completions
from tasks.errors import InvalidRequest, NotFound, quote
from tasks.queue.names import BATCH, queue_name, task_name
from tasks.store.files import check_expires_after, get_file
from tasks.store.models import BatchRow, ChunkRow
from tasks.store.pagination import paginate
from tasks.store.safety import is_id, text_problem
from tasks.store.usage import Usage

log = logging.getLogger(__name__)

COMPLETION_WINDOWS = {"24h": 24 * 3600}
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512


class BatchNotCancellable(InvalidRequest):
    default_code = "batch_not_cancellable"


# the units OpenAI's batch usage reports (as input and output tokens)
TOKEN_UNITS = ("prompt_tokens", "completion_tokens")


def usage_object(usage: Usage) -> dict[str, Any]:
    """OpenAI's batch ``usage`` (tokens, 0 when none), then every other unit the batch's
    lines used, under its own name (e.g. a speech batch's seconds of audio): a client
    that knows only OpenAI's fields reads those and ignores the rest."""
    others = {unit: amount for unit, amount in usage.items() if unit not in TOKEN_UNITS}
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens,
        **others,  # never one of the keys above: tasks.store.usage.RESERVED
    }


def batch_object(row: BatchRow, usage: Usage, eta: int | None = None) -> dict[str, Any]:
    """The batch object of ``row``, whose usage is ``usage`` and estimated completion time
    ``eta`` (``describe`` reads them)."""
    return {
        "id": row.id,
        "object": "batch",
        "endpoint": row.endpoint,
        "model": row.model,
        "errors": {"object": "list", "data": row.errors} if row.errors else None,
        "input_file_id": row.input_file_id,
        "completion_window": row.completion_window,
        "status": row.status,
        "output_file_id": row.output_file_id,
        "error_file_id": row.error_file_id,
        "created_at": row.created_at,
        "in_progress_at": row.in_progress_at,
        "expires_at": row.expires_at,
        "finalizing_at": row.finalizing_at,
        "completed_at": row.completed_at,
        "failed_at": row.failed_at,
        "expired_at": row.expired_at,
        "cancelling_at": row.cancelling_at,
        "cancelled_at": row.cancelled_at,
        "request_counts": {
            "total": row.request_total,
            "completed": row.request_completed,
            "failed": row.request_failed,
        },
        "metadata": row.metadata_,
        "usage": usage_object(usage),
        # our extension: when a validating or running batch should be done (unix seconds),
        # from the model's measured rate and the batch's own pace (tasks/benchmarks/)
        "estimated_completion_at": eta,
    }


def describe(
    session: Session, row: BatchRow, *, workers: Mapping[str, int] | None = None
) -> dict[str, Any]:
    """The batch object of ``row``, its usage and estimate read from the database
    (``workers``: the warm workers of each model, which its estimate scales by)."""
    etas = completions(session, [row], workers=workers)
    return batch_object(row, batch_usage(session, row.id), etas.get(row.id))


def describe_all(
    session: Session, rows: list[BatchRow], *, workers: Mapping[str, int] | None = None
) -> list[dict[str, Any]]:
    """The batch objects of ``rows`` (a page of a listing), their usage read in one query."""
    usages = batch_usages(session, [row.id for row in rows])
    etas = completions(session, rows, workers=workers)
    return [batch_object(row, usages[row.id], etas.get(row.id)) for row in rows]


def check_metadata(metadata: Any) -> dict[str, str] | None:
    """OpenAI's limits: at most 16 pairs, keys of 64 and values of 512 characters."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise InvalidRequest("'metadata' must be an object of strings", param="metadata")
    if len(metadata) > MAX_METADATA_PAIRS:
        raise InvalidRequest(
            f"'metadata' may have at most {MAX_METADATA_PAIRS} pairs, got {len(metadata)}",
            param="metadata",
        )
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidRequest(
                f"metadata keys and values must be strings; {quote(key)} is not",
                param="metadata",
            )
        for what, text, limit in (
            ("key", key, MAX_METADATA_KEY),
            ("value", value, MAX_METADATA_VALUE),
        ):
            problem = text_problem(text, limit)
            if problem is not None:
                raise InvalidRequest(
                    f"metadata {what} {quote(text if what == 'key' else key)} {problem}",
                    param="metadata",
                )
    return dict(metadata)


def _by_idempotency_key(session: Session, key: str, owner: Owner) -> BatchRow | None:
    """``owner``'s batch made with this stored (owner-scoped) key, if any."""
    return session.scalars(
        select(BatchRow).where(BatchRow.idempotency_key == key, owned_by(BatchRow.owner, owner))
    ).first()


def _checked_expiry(output_expires_after: Any) -> dict[str, Any] | None:
    if output_expires_after is None:
        return None
    if not isinstance(output_expires_after, dict):
        raise InvalidRequest(
            "'output_expires_after' must be an object", param="output_expires_after"
        )
    seconds = check_expires_after(
        output_expires_after.get("anchor"),
        output_expires_after.get("seconds"),
        param="output_expires_after",
    )
    return {"anchor": "created_at", "seconds": seconds} if seconds else None


def _check_target(endpoint: str, completion_window: str) -> None:
    if endpoint not in BATCH_ENDPOINTS:
        raise InvalidRequest(
            f"endpoint {quote(endpoint)} is not supported; supported: {', '.join(BATCH_ENDPOINTS)}",
            param="endpoint",
            code="invalid_endpoint",
        )
    if completion_window not in COMPLETION_WINDOWS:
        raise InvalidRequest(
            f"completion_window must be one of {', '.join(COMPLETION_WINDOWS)}",
            param="completion_window",
        )


def _check_input_file(session: Session, input_file_id: str, owner: Owner) -> None:
    try:
        file_row = get_file(session, input_file_id, owner=owner)
    except NotFound:
        raise NotFound(
            f"No such File object: {quote(input_file_id)}", param="input_file_id"
        ) from None
    if file_row.purpose != "batch":
        raise InvalidRequest(
            f"file {input_file_id} has purpose {file_row.purpose!r}; batches need 'batch'",
            param="input_file_id",
        )


def create_batch(
    session: Session,
    *,
    settings: Settings,
    input_file_id: str,
    endpoint: str,
    completion_window: str,
    metadata: Any = None,
    output_expires_after: Any = None,
    idempotency_key: str | None = None,
    owner: Owner = None,
    quota: Quota | None = None,
    trace_context: dict[str, str] | None = None,
) -> tuple[BatchRow, bool]:
    """A new batch in ``validating`` (or ``owner``'s earlier one with the same key) of an
    input file of ``owner``'s, within the key's ``quota`` of open batches and lines in
    flight, keeping ``trace_context`` (its work joins the trace). Returns (row, created)."""
    quota = quota or Quota()
    idempotency_key = scoped_idempotency_key(idempotency_key, owner)
    if idempotency_key:
        found = _by_idempotency_key(session, idempotency_key, owner)
        if found is not None:
            return found, False
    _check_target(endpoint, completion_window)
    metadata = check_metadata(metadata)
    expiry = _checked_expiry(output_expires_after)
    _check_input_file(session, input_file_id, owner)
    check_lines_room(session, owner, quota)
    now = int(time.time())
    row = BatchRow(
        id=f"batch_{uuid.uuid4().hex[:24]}",
        endpoint=endpoint,
        input_file_id=input_file_id,
        completion_window=completion_window,
        status="validating",
        capability=BATCH_ENDPOINTS[endpoint],
        created_at=now,
        expires_at=now + (settings.completion_window_s or COMPLETION_WINDOWS[completion_window]),
        metadata_=metadata,
        output_expires_after=expiry,
        idempotency_key=idempotency_key,
        owner=owner,
        lines_quota=quota.batch_lines,
        request_total=0,
        request_completed=0,
        request_failed=0,
        trace_context=trace_context,
    )
    lock_owner(session, owner)
    session.add(row)
    try:
        session.flush()
    except IntegrityError:  # the same key raced us: keep the first
        session.rollback()
        found = _by_idempotency_key(session, idempotency_key, owner) if idempotency_key else None
        if found is None:
            raise
        return found, False
    check_open_batches(session, owner, quota)  # counted with the new row, under the lock
    return row, True


def get_batch(session: Session, batch_id: str, *, owner: Owner = None) -> BatchRow:
    row = session.get(BatchRow, batch_id) if is_id(batch_id) else None
    if row is None or row.owner != owner:
        raise NotFound(f"No such Batch object: {quote(batch_id)}", param="batch_id")
    return row


def list_batches(
    session: Session, *, limit: int, after: str | None, owner: Owner = None
) -> tuple[list[BatchRow], bool]:
    return paginate(
        session,
        BatchRow,
        where=[],
        scope=[owned_by(BatchRow.owner, owner)],
        limit=limit,
        order="desc",
        after=after,
    )


def request_cancel(session: Session, batch_id: str, *, owner: Owner = None) -> BatchRow:
    """Move the batch to ``cancelling`` and stop every chunk not yet running; a worker
    finishes the cancel (``cancelled``, with what did finish) once none runs."""
    row = get_batch(session, batch_id, owner=owner)
    if row.status in ("cancelling", "cancelled"):
        return row
    if not transition(session, batch_id, "cancelling"):
        raise BatchNotCancellable(
            f"Cannot cancel a batch with status {row.status!r}.", param="batch_id"
        )
    session.execute(
        update(ChunkRow)
        .where(ChunkRow.batch_id == batch_id, ChunkRow.state == "pending")
        .values(state="cancelled", lease_until=None)
    )
    session.flush()
    session.refresh(row)
    return row


def count_by_status(session: Session, *, finished: bool = False) -> dict[str, int]:
    """Batches per open status (what /metrics reports as ``laneway_batches``): a range of
    the status index, bounded by the owners' open-batch quotas; with ``finished``, the
    finished ones instead (every batch there ever was: not for every scrape)."""
    wanted = FINISHED_STATUSES if finished else OPEN_STATUSES
    rows = session.execute(
        select(BatchRow.status, func.count())
        .where(BatchRow.status.in_(wanted))
        .group_by(BatchRow.status)
    )
    counts = dict.fromkeys(wanted, 0)
    counts.update({str(status): int(n) for status, n in rows})
    return counts


# hints waiting on a capability's batch lane beyond which no more are sent: one wakes a
# worker as well as many, and a lane no worker consumes (no model of that capability is
# served anywhere) must not fill a ``noeviction`` Redis with them
MAX_PENDING_HINTS = 8


def notify(capability: str, batch_id: str) -> bool:
    """Wake a worker of ``capability``: this batch has work (a hint; workers also look in
    the database on their own, so a lost or skipped hint only costs a poll interval).
    Returns whether one was sent (not when enough wait on the lane already)."""
    from tasks.queue.celery_app import get_celery

    app = get_celery()
    queue = queue_name(capability, BATCH)
    with app.connection_for_write() as conn:
        if conn.default_channel.client.llen(queue) >= MAX_PENDING_HINTS:
            return False
        app.send_task(task_name(capability, BATCH), args=[batch_id], queue=queue, connection=conn)
    return True
