"""The file store as a directory every process mounts: the default."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from tasks.filestore.base import (
    COPY_CHUNK,
    FileStore,
    LocalFile,
    MissingPart,
    SecondLook,
    check_key,
    full_is_storage_full,
)


class LocalFileStore(FileStore):
    """A directory every process mounts (NFS or similar on several hosts).

    Writes go to a temporary name and are renamed into place."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._looked = SecondLook()  # for sweep

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _tmp(self, key: str) -> Path:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")

    @contextlib.contextmanager
    def _replacing(self, key: str) -> Iterator[BinaryIO]:
        """A file that becomes ``key`` when the block ends without an error (renamed into
        place, so a reader never sees half of it); after an error ``key`` is as it was,
        and no temporary is left. A full disk raises ``StorageFull``."""
        with full_is_storage_full():
            tmp = self._tmp(key)
            try:
                with tmp.open("wb") as out:
                    yield out
                os.replace(tmp, self.path(key))
            finally:
                tmp.unlink(missing_ok=True)

    def write_from(self, key: str, source: BinaryIO, *, limit: int | None = None) -> int:
        """Copy a stream into ``key`` in 1 MiB pieces; returns the bytes written."""
        with self._replacing(key) as out:
            while piece := source.read(COPY_CHUNK):
                if limit is not None and out.tell() + len(piece) > limit:
                    raise OverflowError(out.tell() + len(piece))
                out.write(piece)
            return out.tell()

    def write_lines(self, key: str, lines: Iterator[bytes]) -> int:
        with self._replacing(key) as out:
            out.writelines(lines)
            return out.tell()

    def concat(self, key: str, parts: Iterable[str]) -> int:
        with self._replacing(key) as out:
            for part in parts:
                try:
                    src = self.path(part).open("rb")
                except FileNotFoundError:
                    raise MissingPart(part) from None
                with src:
                    shutil.copyfileobj(src, out, COPY_CHUNK)
            return out.tell()

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
        present, old = [], []
        for tmp in self.root.rglob(".*.tmp"):  # only _tmp's names: .<name>.<hex>.tmp
            with contextlib.suppress(FileNotFoundError):  # renamed into place meanwhile
                if tmp.is_file():
                    present.append(tmp)
                    if tmp.stat().st_mtime < cutoff:
                        old.append(tmp)
        removed = 0
        for tmp in self._looked.confirm(present, old):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed += 1
        return removed

    def local_file(self, key: str) -> LocalFile:
        """The store's own file: no copy, and closing it keeps it."""
        path = self.path(key)
        if not path.is_file():
            raise FileNotFoundError(key)
        return LocalFile(path, temporary=False)
