"""The file store: a directory every process (API and workers, on any host) can reach.

Writes go to a temporary name and are renamed into place, so a reader never sees half a
file and a retried write simply replaces the earlier one.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from configs.settings import Settings, get_settings

COPY_CHUNK = 1024 * 1024


class MissingPart(FileNotFoundError):
    """A part to assemble is not in the store: the whole would be short, so nothing is
    written."""


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

    def concat(self, key: str, parts: Iterable[str]) -> int:
        """``key`` = the parts one after another. A missing part raises ``MissingPart``
        and leaves ``key`` as it was: a short file is never written."""
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
        """The lines in bytes [start, end), read one at a time."""
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
        """The keys directly inside the directory ``prefix`` (none when it is absent)."""
        path = self.path(prefix)
        if not path.is_dir():
            return []
        return [f"{prefix.rstrip('/')}/{p.name}" for p in path.iterdir()]


def get_file_store(settings: Settings | None = None) -> FileStore:
    settings = settings or get_settings()
    root = settings.effective_file_store
    root.mkdir(parents=True, exist_ok=True)
    return FileStore(root)
