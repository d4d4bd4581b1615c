"""The reaper: every worker runs one; the database decides, so several do no harm.

Each pass puts back the chunks whose run stopped renewing its lease (the worker died or
froze), makes the cheap status moves (``lifecycle.advance``) for every open batch, and
deletes the content of expired files and what a finaliser that died right after its
commit left (``leftovers.remove_owed``); now and then it also sweeps the file store of what
writers killed mid-write left (``Sweeper``). Validations and finalisations whose claimant died
need nothing here: their lapsed lease makes them claimable again.
"""

from __future__ import annotations

import logging
import time

from sqlalchemy import select, update

from tasks.batches.leftovers import remove_owed
from tasks.batches.lifecycle import advance
from tasks.batches.status import now
from tasks.filestore import FileStore
from tasks.store.db import session_scope
from tasks.store.files import expire_files
from tasks.store.models import BatchRow, ChunkRow

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


# what a writer killed mid-write leaves in the file store is swept this often, once it
# is this old (a live write is never that old: an upload is at most a few hundred MB)
SWEEP_EVERY_S = 600.0
ABANDONED_AFTER_S = 6 * 3600.0


class Sweeper:
    """``store.sweep`` at most every ``every_s`` (the reaper passes every few seconds)."""

    def __init__(self, every_s: float = SWEEP_EVERY_S, after_s: float = ABANDONED_AFTER_S):
        self.every_s, self.after_s = every_s, after_s
        self.swept_at = float("-inf")

    def __call__(self, store: FileStore) -> int:
        now = time.monotonic()
        if now - self.swept_at < self.every_s:
            return 0
        self.swept_at = now
        removed = store.sweep(self.after_s)
        if removed:
            log.warning("removed %d abandoned write(s) from the file store", removed)
        return removed


def reap(*, store: FileStore, sweep: Sweeper | None = None) -> int:
    """One pass; returns how many chunks and batches it made ready for a worker."""
    ready = requeue_lapsed_chunks() + advance()
    with session_scope() as s:
        expire_files(s, store=store)
    remove_owed(store)
    if sweep is not None:
        sweep(store)
    return ready
