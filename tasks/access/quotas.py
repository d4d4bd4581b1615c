"""Per-key quotas: what one key's owner may keep in the file store and run as batches.

Rate limits (api/limits.py) bound how fast a key asks; quotas bound how much it holds, so
that one key cannot fill the store or the batch lanes for everyone:

- ``stored_bytes`` and ``files``: the owner's files not deleted (uploads and batch
  results; results are counted but never refused, a finished batch must deliver them);
- ``open_batches``: the owner's batches not finished;
- ``batch_lines``: requests of the owner's validated, unfinished batches not answered yet.

Each is a setting (``LANEWAY_QUOTA_*``, 0: none) with per-key overrides (`laneway keys
create --max-*`). They are counted per owner (a key's owner is whose objects it sees) with
the limits of the key that asks.

Counting is race-free with several API processes: the new row is written first, then the
owner's total counted in the same transaction, under a per-owner lock on Postgres (an
advisory transaction lock) and SQLite's database write lock, so two uploads that arrive
together cannot both pass the last free place; the one over the limit rolls back.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from configs.settings import Settings
from tasks.access.tenancy import Owner, owned_by
from tasks.errors import InvalidRequest, QueueFull
from tasks.store.models import BatchRow, FileRow

# where an over-quota batch is told to retry: batches take minutes, not seconds
RETRY_AFTER_S = 60
FIELDS = ("stored_bytes", "files", "open_batches", "batch_lines")


@dataclass(frozen=True)
class Quota:
    """The ceilings of one key (0: none)."""

    stored_bytes: int = 0
    files: int = 0
    open_batches: int = 0
    batch_lines: int = 0

    @classmethod
    def of(cls, settings: Settings, overrides: Mapping[str, int | None] | None = None) -> Quota:
        """The settings' defaults, each replaced by the key's own where it has one
        (``overrides``: field name -> value, None for the default)."""
        given = overrides or {}
        values = {
            name: value
            if (value := given.get(name)) is not None
            else getattr(settings, f"quota_{name}")
            for name in FIELDS
        }
        return cls(**values)


class StorageQuotaExceeded(InvalidRequest):
    """Over stored bytes or files: waiting does not help, deleting files does (400)."""

    default_code = "storage_quota_exceeded"


class BatchQuotaExceeded(QueueFull):
    """Over open batches or batch lines in flight: they free up as batches finish (429)."""

    default_code = "batch_quota_exceeded"


def lock_owner(session: Session, owner: Owner) -> None:
    """Hold the owner's quota lock until the transaction ends (Postgres; SQLite's write
    lock, taken by the row written before counting, serialises writers already)."""
    if session.get_bind().dialect.name != "postgresql":
        return
    name = "\x00" if owner is None else owner
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
    session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


def _stored(session: Session, owner: Owner) -> tuple[int, int]:
    """(bytes, files) the owner has in the store."""
    total, count = session.execute(
        select(func.coalesce(func.sum(FileRow.bytes), 0), func.count()).where(
            owned_by(FileRow.owner, owner), FileRow.deleted.is_(False)
        )
    ).one()
    return int(total), int(count)


def room_to_store(session: Session, owner: Owner, quota: Quota) -> int | None:
    """Before an upload: the bytes the owner may still store (None: no limit); a 400
    naming the limit when there is no room for even one more file."""
    if not (quota.stored_bytes or quota.files):
        return None
    used, count = _stored(session, owner)
    if quota.files and count >= quota.files:
        raise _too_many_files(quota)
    if quota.stored_bytes:
        if used >= quota.stored_bytes:
            raise stored_bytes_exceeded(quota, used)
        return quota.stored_bytes - used
    return None


def check_stored(session: Session, owner: Owner, quota: Quota) -> None:
    """After writing the owner's new file row (in the same transaction, under
    ``lock_owner``): a 400 naming the limit when the owner is now over it."""
    if not (quota.stored_bytes or quota.files):
        return
    used, count = _stored(session, owner)
    if quota.files and count > quota.files:
        raise _too_many_files(quota)
    if quota.stored_bytes and used > quota.stored_bytes:
        raise stored_bytes_exceeded(quota, used)


def _too_many_files(quota: Quota) -> StorageQuotaExceeded:
    return StorageQuotaExceeded(
        f"This key's files quota is {quota.files} files, and its owner has that many "
        "already: delete files (DELETE /v1/files/{file_id}) before uploading more.",
        param="file",
    )


def stored_bytes_exceeded(quota: Quota, used: int | None = None) -> StorageQuotaExceeded:
    now = f" (stored now: {used} bytes)" if used is not None else ""
    return StorageQuotaExceeded(
        f"This key's storage quota is {quota.stored_bytes} bytes{now}, and this file does "
        "not fit: delete files (DELETE /v1/files/{file_id}) before uploading more.",
        param="file",
    )


def _open_statuses() -> tuple[str, ...]:
    from tasks.batches.status import OPEN_STATUSES  # tasks.batches imports tasks.store.files

    return OPEN_STATUSES


def check_open_batches(session: Session, owner: Owner, quota: Quota) -> None:
    """After writing the owner's new batch row (same transaction, under ``lock_owner``):
    a 429 naming the limit when the owner now has more open batches than it allows."""
    if not quota.open_batches:
        return
    count = session.scalar(
        select(func.count()).where(
            owned_by(BatchRow.owner, owner), BatchRow.status.in_(_open_statuses())
        )
    )
    if int(count or 0) > quota.open_batches:
        raise BatchQuotaExceeded(
            f"This key's quota is {quota.open_batches} open batches, and its owner has "
            "that many: wait for one to finish, or cancel one.",
            retry_after=RETRY_AFTER_S,
        )


def lines_in_flight(session: Session, owner: Owner) -> int:
    """Requests of the owner's validated, unfinished batches not answered yet."""
    validated = ("in_progress", "finalizing", "cancelling")
    left = BatchRow.request_total - BatchRow.request_completed - BatchRow.request_failed
    total = session.scalar(
        select(func.coalesce(func.sum(left), 0)).where(
            owned_by(BatchRow.owner, owner), BatchRow.status.in_(validated)
        )
    )
    return int(total or 0)


def check_lines_room(session: Session, owner: Owner, quota: Quota) -> None:
    """Before a new batch: a 429 naming the limit when the owner's batches in flight
    already hold every line it allows (the new batch's own lines are checked once its
    validation has counted them: ``lines_error``)."""
    if quota.batch_lines and lines_in_flight(session, owner) >= quota.batch_lines:
        raise BatchQuotaExceeded(
            f"This key's quota is {quota.batch_lines} batch requests in flight, and its "
            "owner's running batches hold that many: wait for them to finish.",
            retry_after=RETRY_AFTER_S,
        )


def lines_error(limit: int, in_flight: int) -> dict[str, Any]:
    """The ``errors.data`` entry of a batch whose lines would pass the owner's limit (as
    OpenAI fails a batch over its enqueued-token limit)."""
    return {
        "code": "batch_lines_limit_exceeded",
        "line": None,
        "message": f"Batch requests in flight would be {in_flight}, over this key's quota "
        f"of {limit}. Try again once some in_progress batches have completed.",
        "param": None,
    }
