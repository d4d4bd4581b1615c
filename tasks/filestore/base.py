"""What every file store offers (``FileStore``), and what goes with it: the key rule, the
local file handed to code that needs a path, the error for a missing part."""

from __future__ import annotations

import contextlib
import errno
from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, TypeVar

from tasks.errors import StorageFull

COPY_CHUNK = 1024 * 1024
# what a full disk (or a user's full quota on it) says to a write
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class MissingPart(FileNotFoundError):
    """A part to assemble is not in the store: the whole would be short, so nothing is
    written."""


@contextlib.contextmanager
def full_is_storage_full() -> Iterator[None]:
    """A write's ``OSError`` for a full store becomes ``StorageFull``: the one error every
    caller (an upload, a chunk's parts, a finalisation) knows to be temporary and not the
    data's fault; other errors pass as they are. The message names no key: a client may
    read it (a live upload's answer)."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in FULL_ERRNOS:
            raise
        raise StorageFull(
            f"the file store is full ({exc.strerror}); retry once space has been freed"
        ) from exc


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
        temporaries, S3's open multipart uploads) untouched for ``older_than_s`` and
        already there at this store's previous sweep (``SecondLook``); returns how many.
        Never touches a written object."""

    def write_keeping_local(
        self, key: str, source: BinaryIO, *, limit: int | None = None
    ) -> tuple[int, LocalFile]:
        """``write_from``, and the content as ``local_file`` gives it, for a caller that
        goes on to read what it wrote (an upload it probes). A remote store keeps the copy
        it wrote from rather than download it again."""
        size = self.write_from(key, source, limit=limit)
        return size, self.local_file(key)


_Seen = TypeVar("_Seen", bound=Hashable)


class SecondLook:
    """What a sweep may remove: what is old by the store's own clock and was already there
    at the previous sweep. A write under way is never removed on first sight, so a store
    whose clock is wrong (or an emulator that dates every upload years back) cannot lose
    it; what was really abandoned goes one sweep later."""

    def __init__(self) -> None:
        self._before: frozenset[Hashable] = frozenset()

    def confirm(self, present: Iterable[_Seen], old: Iterable[_Seen]) -> list[_Seen]:
        """``old`` that was also present at the previous call; ``present`` is remembered."""
        before, self._before = self._before, frozenset(present)
        return [x for x in old if x in before]
