"""Files: OpenAI file objects over the file store and the ``files`` table."""

from __future__ import annotations

import time
import uuid
from typing import Any, BinaryIO, Literal

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tasks.errors import InvalidRequest, NotFound, PayloadTooLarge
from tasks.filestore import FileStore
from tasks.models import BatchRow, FileRow
from tasks.pagination import paginate

UPLOAD_PURPOSES = ("batch", "user_data", "fine-tune", "assistants", "vision", "evals")
OUTPUT_PURPOSE = "batch_output"
MIN_EXPIRY_S, MAX_EXPIRY_S = 3600, 30 * 24 * 3600


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


def check_expires_after(anchor: str | None, seconds: int | None, *, param: str) -> int | None:
    """Seconds after creation the object expires (None: never), with OpenAI's bounds."""
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise InvalidRequest(f"'{param}[anchor]' must be 'created_at'", param=f"{param}[anchor]")
    if seconds is None or not MIN_EXPIRY_S <= seconds <= MAX_EXPIRY_S:
        raise InvalidRequest(
            f"'{param}[seconds]' must be between {MIN_EXPIRY_S} and {MAX_EXPIRY_S}",
            param=f"{param}[seconds]",
        )
    return seconds


def _new_row(
    file_id: str, filename: str, purpose: str, size: int, key: str, expires_after_s: int | None
) -> FileRow:
    now = int(time.time())
    return FileRow(
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


def find_by_idempotency_key(session: Session, key: str | None) -> FileRow | None:
    if not key:
        return None
    return session.scalars(select(FileRow).where(FileRow.idempotency_key == key)).first()


def create_file(
    session: Session,
    *,
    store: FileStore,
    source: BinaryIO,
    filename: str,
    purpose: str,
    max_bytes: int,
    expires_after_s: int | None = None,
    idempotency_key: str | None = None,
) -> FileRow:
    if purpose not in UPLOAD_PURPOSES:
        raise InvalidRequest(
            f"'{purpose}' is not one of {', '.join(UPLOAD_PURPOSES)} - 'purpose'",
            param="purpose",
        )
    existing = find_by_idempotency_key(session, idempotency_key)
    if existing is not None:
        return existing
    file_id = new_file_id()
    key = f"files/{file_id}"
    try:
        size = store.write_from(key, source, limit=max_bytes)
    except OverflowError:
        raise PayloadTooLarge(f"files may be at most {max_bytes} bytes", param="file") from None
    row = _new_row(file_id, filename or "upload", purpose, size, key, expires_after_s)
    row.idempotency_key = idempotency_key or None
    session.add(row)
    try:
        session.flush()
    except IntegrityError:  # the same key raced us: keep the first
        session.rollback()
        store.delete(key)
        winner = find_by_idempotency_key(session, idempotency_key)
        if winner is None:
            raise
        return winner
    return row


def get_file(session: Session, file_id: str) -> FileRow:
    row = session.get(FileRow, file_id)
    if row is None or row.deleted or (row.expires_at is not None and row.expires_at <= time.time()):
        raise NotFound(f"No such File object: {file_id}", param="file_id")
    return row


def list_files(
    session: Session,
    *,
    purpose: str | None,
    limit: int,
    order: Literal["asc", "desc"],
    after: str | None,
) -> tuple[list[FileRow], bool]:
    now = int(time.time())
    where: list[Any] = [
        FileRow.deleted.is_(False),
        (FileRow.expires_at.is_(None)) | (FileRow.expires_at > now),
    ]
    if purpose:
        where.append(FileRow.purpose == purpose)
    return paginate(session, FileRow, where=where, limit=limit, order=order, after=after)


def _inputs_of_open_batches() -> Any:
    from tasks.batches import OPEN_STATUSES  # tasks.batches imports this module

    return select(BatchRow.input_file_id).where(BatchRow.status.in_(OPEN_STATUSES))


def delete_file(session: Session, *, store: FileStore, file_id: str) -> None:
    row = get_file(session, file_id)
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
) -> None:
    """Record a batch's output or error file; a second call (re-finalisation) updates it.

    It expires ``expires_after_s`` after its ``created_at`` (the batch's
    ``output_expires_after``), or never."""
    row = session.get(FileRow, file_id)
    if row is None:
        session.add(_new_row(file_id, filename, OUTPUT_PURPOSE, size, key, expires_after_s))
    else:
        row.bytes, row.storage_key = size, key
        row.expires_at = row.created_at + expires_after_s if expires_after_s else None


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
