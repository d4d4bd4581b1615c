"""/v1/batches: blocking work (DB, enqueue) that the routes run in a worker thread."""

from __future__ import annotations

import logging
from typing import Any

from api.protocol.batches import CreateBatchRequest
from configs.settings import Settings
from tasks import batches
from tasks.db import session_scope
from tasks.models import BatchRow
from tasks.pagination import page_object, paginate

log = logging.getLogger(__name__)


def create(
    settings: Settings, body: CreateBatchRequest, idempotency_key: str | None
) -> dict[str, Any]:
    with session_scope() as s:
        row, created = batches.create_batch(
            s,
            settings=settings,
            input_file_id=body.input_file_id,
            endpoint=body.endpoint,
            completion_window=body.completion_window,
            metadata=body.metadata,
            output_expires_after=body.output_expires_after,
            idempotency_key=idempotency_key,
        )
        obj = batches.batch_object(row)
        capability = row.capability or ""
    if created:
        try:  # a hint only: the workers' reaper starts any batch left in validating
            batches.enqueue_advance(capability, obj["id"])
        except Exception as exc:
            log.warning("could not enqueue batch %s (the reaper will): %s", obj["id"], exc)
    return obj


def retrieve(batch_id: str) -> dict[str, Any]:
    with session_scope() as s:
        return batches.batch_object(batches.get_batch(s, batch_id))


def listing(*, limit: int, after: str | None) -> dict[str, Any]:
    with session_scope() as s:
        rows, has_more = paginate(s, BatchRow, where=[], limit=limit, order="desc", after=after)
        return page_object([batches.batch_object(r) for r in rows], has_more)


def cancel(batch_id: str) -> dict[str, Any]:
    with session_scope() as s:
        row = batches.request_cancel(s, batch_id)
        obj = batches.batch_object(row)
        capability, status = row.capability or "", row.status
    if status == "cancelling":
        try:  # let a worker finish the cancel now rather than at the next reaper pass
            batches.enqueue_advance(capability, batch_id)
        except Exception as exc:
            log.warning("could not enqueue cancel of %s (the reaper will): %s", batch_id, exc)
    return obj
