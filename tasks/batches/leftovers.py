"""What a finished batch leaves in the file store, and who removes it.

A finished batch needs neither its chunk parts (``batches/<id>/``) nor the result files a
finaliser wrote but never got counted (``results/<id>/``, from one that crashed or lost
its lease). The finaliser's commit moves the batch to its final status and keeps a lease
on it for ``CLEANUP_LEASE_S``: the removal is still owed. The finaliser removes them at
once and releases the lease (``remove_leftovers`` then ``release``). If it dies between
its commit and its release, the lease runs out, and a reaper claims the batch and does
the same (``remove_owed``), so a crash there leaves nothing in the store for good.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

from sqlalchemy import select
from sqlalchemy.orm import Session

from tasks.batches import status
from tasks.filestore import FileStore
from tasks.store.db import session_scope
from tasks.store.models import BatchRow, FileRow

log = logging.getLogger(__name__)

# how long a finaliser has for its removal before a reaper may do it instead (removing
# twice is harmless: every delete is of something nobody needs)
CLEANUP_LEASE_S = 300.0
OWED_PER_PASS = 16
# claims of one batch's removal before it is given up (each claim is counted, so one
# that crashes its worker every time ends too)
MAX_CLEANUPS = 5


def parts_dir(batch_id: str) -> str:
    """Where a batch's chunk runs write their parts."""
    return f"batches/{batch_id}"


def results_dir(batch_id: str) -> str:
    """Where a batch's finalisers write its output and error files (a directory per
    batch, so cleaning up after a crashed finaliser reads only this batch's entries)."""
    return f"results/{batch_id}"


def remove_leftovers(store: FileStore, batch_id: str, keep: Collection[str]) -> None:
    """Remove the batch's chunk parts and every result file but those in ``keep``."""
    store.delete_tree(parts_dir(batch_id))
    for other in store.listdir(results_dir(batch_id)):
        if other not in keep:
            store.delete(other)


def release(batch_id: str, token: str) -> None:
    """Nothing is owed any more: end the lease taken for the removal."""
    with session_scope() as s:
        status.release(s, batch_id, token)


def _counted_files(s: Session, batch_id: str) -> set[str]:
    """The storage keys of the output and error files the batch points at."""
    batch = s.get(BatchRow, batch_id)
    ids = [i for i in (batch.output_file_id, batch.error_file_id) if i] if batch else []
    return set(s.scalars(select(FileRow.storage_key).where(FileRow.id.in_(ids))))


def remove_owed(store: FileStore) -> int:
    """For finished batches whose finaliser died before its removal (their lease ran
    out), claim each and remove what it left; returns how many batches."""
    with session_scope() as s:
        owed = s.execute(
            select(BatchRow.id, BatchRow.status)
            .where(
                BatchRow.status.in_(status.FINISHED_STATUSES), BatchRow.lease_until < status.now()
            )
            .order_by(BatchRow.lease_until)
            .limit(OWED_PER_PASS)
        ).all()
    removed = 0
    for batch_id, batch_status in owed:
        with session_scope() as s:
            claimed = status.claim(s, batch_id, batch_status, CLEANUP_LEASE_S)
            keep = _counted_files(s, batch_id) if claimed else set()
        if claimed is None:  # another reaper took it
            continue
        token, attempt = claimed
        if attempt > MAX_CLEANUPS:  # it broke every time: stop trying (and say so)
            log.error("batch %s: its leftovers could not be removed; giving up", batch_id)
        else:
            remove_leftovers(store, batch_id, keep)
            removed += 1
        release(batch_id, token)
    if removed:
        log.warning("removed what %d finished batch(es) left behind their finaliser", removed)
    return removed
