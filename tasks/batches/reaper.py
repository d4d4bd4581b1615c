"""The reaper: every worker runs one; the database decides, so several do no harm.

Each pass puts back the chunks whose run stopped renewing its lease (the worker died or
froze), makes the cheap status moves (``lifecycle.advance``) for every open batch, and
deletes the content of expired files. Validations and finalisations whose claimant died
need nothing here: their lapsed lease makes them claimable again.
"""

from __future__ import annotations

import logging

from sqlalchemy import select, update

from tasks.batches.lifecycle import advance
from tasks.batches.status import now
from tasks.db import session_scope
from tasks.files import expire_files
from tasks.filestore import FileStore
from tasks.models import BatchRow, ChunkRow

log = logging.getLogger(__name__)


def requeue_lapsed_chunks() -> int:
    """Running chunks whose lease ran out go back to pending (or to cancelled when their
    batch stopped meanwhile); their attempts keep counting."""
    t = now()
    moved = 0
    with session_scope() as s:
        lapsed = s.execute(
            select(ChunkRow.id, ChunkRow.attempts, BatchRow.status)
            .join(BatchRow, BatchRow.id == ChunkRow.batch_id)
            .where(ChunkRow.state == "running", ChunkRow.lease_until < t)
        ).all()
        for chunk_id, attempts, batch_status in lapsed:
            moved += s.execute(
                update(ChunkRow)
                .where(
                    ChunkRow.id == chunk_id,
                    ChunkRow.state == "running",
                    ChunkRow.attempts == attempts,
                    ChunkRow.lease_until < t,
                )
                .values(
                    state="pending" if batch_status == "in_progress" else "cancelled",
                    lease_until=None,
                )
            ).rowcount  # type: ignore[attr-defined]
    if moved:
        log.warning("%d chunk(s) lost their worker; they run again", moved)
    return moved


def reap(*, store: FileStore) -> int:
    """One pass; returns how many chunks and batches it made ready for a worker."""
    ready = requeue_lapsed_chunks() + advance()
    with session_scope() as s:
        expire_files(s, store=store)
    return ready
