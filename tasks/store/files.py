"""Files: OpenAI file objects over the file store and the ``files`` table."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, BinaryIO, Literal

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tasks.access.quotas import (
    Quota,
    check_stored,
    lock_owner,
    room_to_store,
    stored_bytes_exceeded,
)
from tasks.access.tenancy import Owner, owned_by, scoped_idempotency_key
from tasks.errors import InvalidRequest, NotFound, PayloadTooLarge, StorageFull, quote
from tasks.filestore import FileStore
from tasks.store.db import session_scope
from tasks.store.models import BatchRow, FileRow
from tasks.store.pagination import paginate
from tasks.store.safety import is_id, text_problem

log = logging.getLogger(__name__)

UPLOAD_PURPOSES = ("batch", "user_data", "fine-tune", "assistants", "vision", "evals")
OUTPUT_PURPOSE = "batch_output"
MIN_EXPIRY_S, MAX_EXPIRY_S = 3600, 30 * 24 * 3600
MAX_FILENAME = 512  # the column's length


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex[:24]}"


def file_object(row: FileRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "file",
        "bytes": row.bytes,
        "created_at": row.created_at,
        "expires_at": row.expires_at,
        "filename": row.filename,
        "purpose": row.purpose,
        "status": row.status,
        "status_details": None,
    }


def check_expires_after(anchor: Any, seconds: Any, *, param: str) -> int | None:
    """Seconds after creation the object expires (None: never), with OpenAI's bounds."""
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise InvalidRequest(f"'{param}[anchor]' must be 'created_at'", param=f"{param}[anchor]")
    if (
        not isinstance(seconds, int)
        or isinstance(seconds, bool)
        or not MIN_EXPIRY_S <= seconds <= MAX_EXPIRY_S
    ):
        raise InvalidRequest(
            f"'{param}[seconds]' must be an integer between {MIN_EXPIRY_S} and {MAX_EXPIRY_S}",
            param=f"{param}[seconds]",
        )
    return seconds


def _new_row(
    file_id: str,
    filename: str,
    purpose: str,
    size: int,
    key: str,
    expires_after_s: int | None,
    owner: Owner,
) -> FileRow:
    now = int(time.time())
    return FileRow(
        owner=owner,
        id=file_id,
        filename=filename,
        purpose=purpose,
        bytes=size,
        created_at=now,
        expires_at=now + expires_after_s if expires_after_s else None,
        status="processed",
        storage_key=key,
        deleted=False,
    )


def find_by_idempotency_key(session: Session, key: str | None, owner: Owner) -> FileRow | None:
    """``owner``'s file made with this stored (scoped) key, if any."""
    if not key:
        return None
    return session.scalars(
        select(FileRow).where(FileRow.idempotency_key == key, owned_by(FileRow.owner, owner))
    ).first()


def check_upload(
    *, filename: str, purpose: str, idempotency_key: str | None, owner: Owner = None
) -> tuple[str, str | None]:
    """The upload's name and key as they will be stored; 400 for what cannot be."""
    if purpose not in UPLOAD_PURPOSES:
        raise InvalidRequest(
            f"{quote(purpose)} is not one of {', '.join(UPLOAD_PURPOSES)} - 'purpose'",
            param="purpose",
        )
    filename = filename or "upload"
    problem = text_problem(filename, MAX_FILENAME)
    if problem is not None:
        raise InvalidRequest(f"the file's name {problem}", param="file")
    return filename, scoped_idempotency_key(idempotency_key, owner)


def create_file(
    *,
    store: FileStore,
    source: BinaryIO,
    filename: str,
    purpose: str,
    max_bytes: int,
    expires_after_s: int | None = None,
    idempotency_key: str | None = None,
    owner: Owner = None,
    quota: Quota | None = None,
) -> dict[str, Any]:
    """Store an upload and record it; returns the file object.

    No database transaction is open while the bytes are copied (up to ``max_bytes``, or
    what the owner's ``quota`` has room for): the copy comes first, then the row in one
    short transaction, which also checks the quota with the row counted. A copy that
    fails leaves no blob (the store writes to a temporary name), a full store included
    (``StorageFull``, a 503); a row that cannot be written, or does not fit the quota,
    takes its blob with it."""
    quota = quota or Quota()
    filename, idempotency_key = check_upload(
        filename=filename, purpose=purpose, idempotency_key=idempotency_key, owner=owner
    )
    with session_scope() as s:
        existing = find_by_idempotency_key(s, idempotency_key, owner)
        if existing is not None:
            return file_object(existing)
        room = room_to_store(s, owner, quota)
    file_id = new_file_id()
    key = f"files/{file_id}"
    size = _copy(store, key, source, max_bytes=max_bytes, room=room, quota=quota)
    row = _new_row(file_id, filename, purpose, size, key, expires_after_s, owner)
    row.idempotency_key = idempotency_key
    try:
        with session_scope() as s:
            lock_owner(s, owner)
            s.add(row)
            s.flush()
            check_stored(s, owner, quota)
            return file_object(row)
    except IntegrityError:  # the same key raced us: keep the first
        store.delete(key)
        with session_scope() as s:
            winner = find_by_idempotency_key(s, idempotency_key, owner)
            if winner is None:
                raise
            return file_object(winner)
    except BaseException:
        store.delete(key)
        raise


def _copy(
    store: FileStore,
    key: str,
    source: BinaryIO,
    *,
    max_bytes: int,
    room: int | None,
    quota: Quota,
) -> int:
    """An upload's bytes into the store under ``key`` (at most ``max_bytes``, or the
    ``room`` the owner's quota leaves); its size. A copy that fails keeps nothing."""
    limit = max_bytes if room is None else min(max_bytes, room)
    try:
        return store.write_from(key, source, limit=limit)
    except OverflowError:
        if limit < max_bytes:
            raise stored_bytes_exceeded(quota) from None
        raise PayloadTooLarge(f"files may be at most {max_bytes} bytes", param="file") from None
    except StorageFull as exc:  # the store kept nothing of it, and no row was written
        log.error("upload to %s not stored: %s", key, exc)
        raise StorageFull(
            "the file store is full: the file could not be stored. Nothing of it was kept; "
            "retry once space has been freed",
            param="file",
        ) from None


def get_file(session: Session, file_id: str, *, owner: Owner = None) -> FileRow:
    """The file, if ``owner``'s and not deleted or expired; else 404."""
    row = session.get(FileRow, file_id) if is_id(file_id) else None
    if (
        row is None
        or row.owner != owner
        or row.deleted
        or (row.expires_at is not None and row.expires_at <= time.time())
    ):
        raise NotFound(f"No such File object: {quote(file_id)}", param="file_id")
    return row


def list_files(
    session: Session,
    *,
    purpose: str | None,
    limit: int,
    order: Literal["asc", "desc"],
    after: str | None,
    owner: Owner = None,
) -> tuple[list[FileRow], bool]:
    now = int(time.time())
    where: list[Any] = [
        FileRow.deleted.is_(False),
        (FileRow.expires_at.is_(None)) | (FileRow.expires_at > now),
    ]
    if purpose:
        if purpose not in (*UPLOAD_PURPOSES, OUTPUT_PURPOSE):
            raise InvalidRequest(f"unknown purpose {quote(purpose)}", param="purpose")
        where.append(FileRow.purpose == purpose)
    return paginate(
        session,
        FileRow,
        where=where,
        scope=[owned_by(FileRow.owner, owner)],
        limit=limit,
        order=order,
        after=after,
    )


def _inputs_of_open_batches() -> Any:
    from tasks.batches.status import OPEN_STATUSES  # tasks.batches imports this module

    return select(BatchRow.input_file_id).where(BatchRow.status.in_(OPEN_STATUSES))


def delete_file(session: Session, *, store: FileStore, file_id: str, owner: Owner = None) -> None:
    row = get_file(session, file_id, owner=owner)
    in_use = session.scalars(
        _inputs_of_open_batches().where(BatchRow.input_file_id == file_id).limit(1)
    ).first()
    if in_use is not None:
        # a batch still reads it: gone for the API now (expired), content removed by
        # expire_files once no open batch needs it
        row.expires_at = int(time.time())
        return
    row.deleted = True
    store.delete(row.storage_key)


def put_output_file(
    session: Session,
    *,
    file_id: str,
    key: str,
    filename: str,
    size: int,
    expires_after_s: int | None,
    owner: Owner,
) -> str | None:
    """Record a batch's output or error file; returns the storage key it had before (a
    re-finalisation replaces it), or None for a new file.

    It expires ``expires_after_s`` after its ``created_at`` (the batch's
    ``output_expires_after``), or never."""
    row = session.get(FileRow, file_id)
    if row is None:
        session.add(_new_row(file_id, filename, OUTPUT_PURPOSE, size, key, expires_after_s, owner))
        return None
    old = row.storage_key
    row.bytes, row.storage_key, row.deleted = size, key, False
    row.expires_at = row.created_at + expires_after_s if expires_after_s else None
    return old


def expire_files(session: Session, *, store: FileStore) -> int:
    """Delete the content of files past their expiry (but not the input of a batch that is
    still running: it goes once the batch is over); returns how many."""
    now = int(time.time())
    rows = session.scalars(
        select(FileRow).where(
            FileRow.deleted.is_(False),
            FileRow.expires_at.is_not(None),
            FileRow.expires_at <= now,
            FileRow.id.not_in(_inputs_of_open_batches()),
        )
    ).all()
    for row in rows:
        row.deleted = True
        store.delete(row.storage_key)
    return len(rows)
