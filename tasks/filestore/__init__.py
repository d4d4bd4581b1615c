"""The file store: where uploads, batch chunks and results live, reachable by every process
(API and workers, on any host).

``FileStore`` is the interface; ``get_file_store(settings)`` picks the implementation from
``LANEWAY_FILE_STORE``: a directory (``LocalFileStore``, the default: ``data_dir/files``) or
``s3://bucket/prefix`` (``tasks.filestore.s3.S3FileStore``, imported only then, so the
default needs nothing of boto3).

Keys are relative, ``/``-separated names (``files/<id>``, ``batches/<id>/<n>.out``); ``..``
and a leading ``/`` are refused. Every write is atomic as readers see it: a reader never
sees half an object, and a retried write simply replaces the earlier one.
"""

from __future__ import annotations

import threading

from configs.settings import S3Location, Settings, get_settings
from tasks.filestore.base import COPY_CHUNK, FileStore, LocalFile, MissingPart, check_key
from tasks.filestore.local import LocalFileStore

__all__ = [
    "COPY_CHUNK",
    "FileStore",
    "LocalFile",
    "LocalFileStore",
    "MissingPart",
    "check_key",
    "get_file_store",
]

_S3_STORES: dict[tuple[object, ...], FileStore] = {}
_S3_LOCK = threading.Lock()


def _s3_store(settings: Settings, location: S3Location) -> FileStore:
    """One S3 store (one boto3 client, thread-safe) per process and configuration."""
    secret = settings.s3_secret_access_key
    ident = (
        location,
        settings.s3_endpoint_url,
        settings.s3_region,
        settings.s3_access_key_id,
        secret.get_secret_value() if secret else None,
        settings.s3_addressing_style,
        settings.s3_part_bytes,
    )
    with _S3_LOCK:
        store = _S3_STORES.get(ident)
        if store is None:
            from tasks.filestore.s3 import S3FileStore

            store = _S3_STORES[ident] = S3FileStore.from_settings(settings, location)
        return store


def get_file_store(settings: Settings | None = None) -> FileStore:
    settings = settings or get_settings()
    where = settings.effective_file_store
    if isinstance(where, S3Location):
        return _s3_store(settings, where)
    where.mkdir(parents=True, exist_ok=True)
    return LocalFileStore(where)
