"""/v1/batches: blocking work (DB, enqueue) that the routes run in a worker thread."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from api.protocol.batches import CreateBatchRequest
from configs import tracing
from configs.settings import Settings
from tasks.access.quotas import Quota
from tasks.access.tenancy import Owner
from tasks.batches import service
from tasks.store.db import session_scope
from tasks.store.pagination import page_object

log = logging.getLogger(__name__)


def _hint(capability: str, batch_id: str) -> None:
    """Wake a worker now rather than at its next poll; a lost hint costs only that."""
    try:
        service.notify(capability, batch_id)
    except Exception as exc:
        log.warning("could not notify a worker of batch %s (it will poll): %s", batch_id, exc)


def create(
    settings: Settings,
    body: CreateBatchRequest,
    idempotency_key: str | None,
    owner: Owner,
    quota: Quota,
) -> dict[str, Any]:
    with session_scope() as s:
        row, created = service.create_batch(
            s,
            settings=settings,
            input_file_id=body.input_file_id,
            endpoint=body.endpoint,
            completion_window=body.completion_window,
            metadata=body.metadata,
            output_expires_after=(
                body.output_expires_after.model_dump() if body.output_expires_after else None
            ),
            idempotency_key=idempotency_key,
            owner=owner,
            quota=quota,
            # this request's span: the batch's validation, chunks and lines join its trace
            trace_context=tracing.inject(),
        )
        obj = service.describe(s, row)
        capability = row.capability or ""
    if created:
        _hint(capability, obj["id"])
    return obj


# the warm workers of each model, which estimated completion times scale by
Workers = Mapping[str, int] | None


def retrieve(batch_id: str, owner: Owner, workers: Workers = None) -> dict[str, Any]:
    with session_scope() as s:
        row = service.get_batch(s, batch_id, owner=owner)
        return service.describe(s, row, workers=workers)


def listing(
    *, limit: int, after: str | None, owner: Owner, workers: Workers = None
) -> dict[str, Any]:
    with session_scope() as s:
        rows, has_more = service.list_batches(s, limit=limit, after=after, owner=owner)
        return page_object(service.describe_all(s, rows, workers=workers), has_more)


def cancel(batch_id: str, owner: Owner) -> dict[str, Any]:
    with session_scope() as s:
        row = service.request_cancel(s, batch_id, owner=owner)
        obj = service.describe(s, row)
        capability, status = row.capability or "", row.status
    if status == "cancelling":
        _hint(capability, batch_id)
    return obj
