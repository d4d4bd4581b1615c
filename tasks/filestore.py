"""The file store: where uploads, batch chunks and results live, reachable by every process
(API and workers, on any host).

``FileStore`` is the interface; ``get_file_store(settings)`` picks the implementation from
``LANEWAY_FILE_STORE``: a directory (``LocalFileStore``, the default: ``data_dir/files``) or
``s3://bucket/prefix`` (``tasks.filestore_s3.S3FileStore``, imported only then, so the
default needs nothing of boto3).

Keys are relative, ``/``-separated names (``files/<id>``, ``batches/<id>/<n>.out``); ``..``
and a leading ``/`` are refused. Every write is atomic as readers see it: a reader never
sees half an object, and a retried write simply replaces the earlier one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from configs.settings import S3Location, Settings, get_settings

COPY_CHUNK = 1024 * 1024


class MissingPart(FileNotFoundError):
    """A part to assemble is not in the store: the whole would be short, so nothing is
    written."""


def check_key(key: str) -> str:
    """``key`` when it stays inside the store; ``ValueError`` when not."""
    if ".." in key.split("/") or key.startswith("/"):
        raise ValueError(f"bad file store key {key!r}")
    return key


class LocalFile:
    """A key's content as a file on this machine, for code that needs a path (a decoder).

    ``close()`` (or leaving the ``with`` block) removes it when it is a temporary copy; a
    local store hands out its own file, which stays."""

    def __init__(self, path: Path, *, temporary: bool) -> None:
        self.path = path
        self.temporary = temporary

    def close(self) -> None:
        if self.temporary:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> LocalFile:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class FileStore(ABC):
    """What every file store offers; nothing outside the store knows where bytes live."""

    @abstractmethod
    def write_from(self, key: str, source: BinaryIO, *, limit: int | None = None) -> int:
        """Copy a stream into ``key``; returns the bytes written. Past ``limit`` bytes it
        raises ``OverflowError`` and leaves ``key`` as it was."""

    @abstractmethod
    def write_lines(self, key: str, lines: Iterator[bytes]) -> int:
        """``key`` = the lines one after another; returns the bytes written."""

    @abstractmethod
    def concat(self, key: str, parts: Iterable[str]) -> int:
        """``key`` = the parts one after another. A missing part raises ``MissingPart``
        and leaves ``key`` as it was: a short file is never written."""

    @abstractmethod
    def open(self, key: str) -> BinaryIO:
        """A readable binary stream (``FileNotFoundError`` when ``key`` is absent)."""

    @abstractmethod
    def iter_lines(self, key: str, start: int, end: int) -> Iterator[bytes]:
        """The lines in bytes [start, end), read one at a time."""

    @abstractmethod
    def iter_bytes(self, key: str) -> Iterator[bytes]:
        """The content in pieces of at most ``COPY_CHUNK`` bytes."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; an absent one is fine."""

    @abstractmethod
    def delete_tree(self, prefix: str) -> None:
        """Remove every key under ``prefix/``."""

    @abstractmethod
    def listdir(self, prefix: str) -> list[str]:
        """The keys directly inside ``prefix`` (``f"{prefix}/{name}"``; none when absent)."""

    @abstractmethod
    def local_file(self, key: str) -> LocalFile:
        """``key`` as a file on this machine, until the returned object is closed
        (``FileNotFoundError`` when ``key`` is absent)."""

    @abstractmethod
    def sweep(self, older_than_s: float) -> int:
        """Remove what writers killed mid-write left behind (a directory store's
        temporaries, S3's open multipart uploads) untouched for ``older_than_s``; returns
        how many. Never touches a written object."""

    def write_keeping_local(
        self, key: str, source: BinaryIO, *, limit: int | None = None
    ) -> tuple[int, LocalFile]:
        """``write_from``, and the content as ``local_file`` gives it, for a caller that
        goes on to read what it wrote (an upload it probes). A remote store keeps the copy
        it wrote from rather than download it again."""
        size = self.write_from(key, source, limit=limit)
        return size, self.local_file(key)


class LocalFileStore(FileStore):
    """A directory every process mounts (NFS or similar on several hosts).

    Writes go to a temporary name and are renamed into place."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _tmp(self, key: str) -> Path:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")

    def write_from(self, key: str, source: BinaryIO, *, limit: int | None = None) -> int:
        """Copy a stream into ``key`` in 1 MiB pieces; returns the bytes written."""
        tmp = self._tmp(key)
        written = 0
        try:
            with tmp.open("wb") as out:
                while piece := source.read(COPY_CHUNK):
                    written += len(piece)
                    if limit is not None and written > limit:
                        raise OverflowError(written)
                    out.write(piece)
            os.replace(tmp, self.path(key))
        finally:
            tmp.unlink(missing_ok=True)
        return written

    def write_lines(self, key: str, lines: Iterator[bytes]) -> int:
        tmp = self._tmp(key)
        written = 0
        try:
            with tmp.open("wb") as out:
                for line in lines:
                    out.write(line)
                    written += len(line)
            os.replace(tmp, self.path(key))
        finally:
            tmp.unlink(missing_ok=True)
        return written

    def concat(self, key: str, parts: Iterable[str]) -> int:
        tmp = self._tmp(key)
        written = 0
        try:
            with tmp.open("wb") as out:
                for part in parts:
                    try:
                        src = self.path(part).open("rb")
                    except FileNotFoundError:
                        raise MissingPart(part) from None
                    with src:
                        while piece := src.read(COPY_CHUNK):
                            out.write(piece)
                            written += len(piece)
            os.replace(tmp, self.path(key))
        finally:
            tmp.unlink(missing_ok=True)
        return written

    def open(self, key: str) -> BinaryIO:
        return self.path(key).open("rb")

    def iter_lines(self, key: str, start: int, end: int) -> Iterator[bytes]:
        with self.path(key).open("rb") as f:
            f.seek(start)
            left = end - start
            while left > 0:
                line = f.readline(left)
                if not line:
                    return
                left -= len(line)
                yield line

    def iter_bytes(self, key: str) -> Iterator[bytes]:
        with self.path(key).open("rb") as f:
            while piece := f.read(COPY_CHUNK):
                yield piece

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def delete_tree(self, prefix: str) -> None:
        shutil.rmtree(self.path(prefix), ignore_errors=True)

    def listdir(self, prefix: str) -> list[str]:
        path = self.path(prefix)
        if not path.is_dir():
            return []
        return [f"{prefix.rstrip('/')}/{p.name}" for p in path.iterdir()]

    def sweep(self, older_than_s: float) -> int:
        cutoff = time.time() - older_than_s
        removed = 0
        for tmp in self.root.rglob(".*.tmp"):  # only _tmp's names: .<name>.<hex>.tmp
            with contextlib.suppress(FileNotFoundError):  # renamed into place meanwhile
                if tmp.is_file() and tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
                    removed += 1
        return removed

    def local_file(self, key: str) -> LocalFile:
        """The store's own file: no copy, and closing it keeps it."""
        path = self.path(key)
        if not path.is_file():
            raise FileNotFoundError(key)
        return LocalFile(path, temporary=False)


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
            from tasks.filestore_s3 import S3FileStore

            store = _S3_STORES[ident] = S3FileStore.from_settings(settings, location)
        return store


def get_file_store(settings: Settings | None = None) -> FileStore:
    settings = settings or get_settings()
    where = settings.effective_file_store
    if isinstance(where, S3Location):
        return _s3_store(settings, where)
    where.mkdir(parents=True, exist_ok=True)
    return LocalFileStore(where)
