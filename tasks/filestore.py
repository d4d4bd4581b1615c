"""The file store: a directory every process (API and workers, on any host) can reach.

Writes go to a temporary name and are renamed into place, so a reader never sees half a
file and a retried write simply replaces the earlier one.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from configs.settings import Settings, get_settings

COPY_CHUNK = 1024 * 1024


class FileStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: str) -> Path:
        if ".." in key.split("/") or key.startswith("/"):
            raise ValueError(f"bad file store key {key!r}")
        return self.root / key

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

    def concat(self, key: str, parts: list[str]) -> int:
        """``key`` = the parts one after another (missing parts count as empty)."""
        tmp = self._tmp(key)
        written = 0
        try:
            with tmp.open("wb") as out:
                for part in parts:
                    path = self.path(part)
                    if path.exists():
                        with path.open("rb") as src:
                            shutil.copyfileobj(src, out, COPY_CHUNK)
                        written += path.stat().st_size
            os.replace(tmp, self.path(key))
        finally:
            tmp.unlink(missing_ok=True)
        return written

    def open(self, key: str) -> BinaryIO:
        return self.path(key).open("rb")

    def read_range(self, key: str, start: int, end: int) -> bytes:
        with self.path(key).open("rb") as f:
            f.seek(start)
            return f.read(end - start)

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


def get_file_store(settings: Settings | None = None) -> FileStore:
    settings = settings or get_settings()
    root = settings.effective_file_store
    root.mkdir(parents=True, exist_ok=True)
    return FileStore(root)
