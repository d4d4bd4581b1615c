"""/v1/files: blocking work (DB, file store) that the routes run in a worker thread."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, BinaryIO, Literal

from configs.settings import Settings
from tasks.access.quotas import Quota
from tasks.access.tenancy import Owner
from tasks.errors import InvalidRequest
from tasks.filestore import get_file_store
from tasks.store import files
from tasks.store.db import session_scope
from tasks.store.pagination import page_object


def parse_expiry(anchor: Any, seconds: Any) -> int | None:
    if seconds is not None:
        try:
            seconds = int(seconds)
        except (TypeError, ValueError):
            raise InvalidRequest(
                "'expires_after[seconds]' must be an integer", param="expires_after[seconds]"
            ) from None
    return files.check_expires_after(anchor, seconds, param="expires_after")


def upload(
    settings: Settings,
    *,
    source: BinaryIO,
    filename: str,
    purpose: str,
    expires_after_s: int | None,
    idempotency_key: str | None,
    owner: Owner,
    quota: Quota,
) -> dict[str, Any]:
    return files.create_file(
        owner=owner,
        quota=quota,
        store=get_file_store(settings),
        source=source,
        filename=filename,
        purpose=purpose,
        max_bytes=settings.max_file_bytes,
        expires_after_s=expires_after_s,
        idempotency_key=idempotency_key,
    )


def retrieve(file_id: str, owner: Owner) -> dict[str, Any]:
    with session_scope() as s:
        return files.file_object(files.get_file(s, file_id, owner=owner))


def listing(
    *,
    purpose: str | None,
    limit: int,
    order: Literal["asc", "desc"],
    after: str | None,
    owner: Owner,
) -> dict[str, Any]:
    with session_scope() as s:
        rows, has_more = files.list_files(
            s, purpose=purpose, limit=limit, order=order, after=after, owner=owner
        )
        return page_object([files.file_object(r) for r in rows], has_more)


def content(settings: Settings, file_id: str, owner: Owner) -> tuple[Iterator[bytes], str]:
    with session_scope() as s:
        row = files.get_file(s, file_id, owner=owner)
        key, name = row.storage_key, row.filename
    return get_file_store(settings).iter_bytes(key), name


def delete(settings: Settings, file_id: str, owner: Owner) -> dict[str, Any]:
    with session_scope() as s:
        files.delete_file(s, store=get_file_store(settings), file_id=file_id, owner=owner)
    return {"id": file_id, "object": "file", "deleted": True}
