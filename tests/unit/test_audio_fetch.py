"""``workers.audio.local_files``: the audio files of requests that arrived together are
fetched at once (a remote store's downloads overlap), and one failing fails only its own."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tasks.errors import InvalidRequest
from tasks.filestore import LocalFile, LocalFileStore
from workers.audio import local_files


class SlowStore(LocalFileStore):
    """``local_file`` waits until ``parties`` calls are in it together (a barrier): only
    fetches that overlap get past it."""

    def __init__(self, root: Path, parties: int) -> None:
        super().__init__(root)
        self.barrier = threading.Barrier(parties, timeout=5)

    def local_file(self, key: str) -> LocalFile:
        self.barrier.wait()
        return super().local_file(key)


def test_fetches_overlap_and_keep_their_order(tmp_path: Path) -> None:
    store = SlowStore(tmp_path, parties=3)
    for name in ("a", "b", "c"):
        (tmp_path / name).write_bytes(name.encode())
    copies = local_files(store, ["c", "a", "b"])
    assert [c.path.read_bytes() for c in copies if isinstance(c, LocalFile)] == [b"c", b"a", b"b"]


def test_a_missing_or_bad_key_fails_alone(tmp_path: Path) -> None:
    store = LocalFileStore(tmp_path)
    (tmp_path / "here").write_bytes(b"x")
    here, missing, bad = local_files(store, ["here", "gone", "../etc/passwd"])
    assert isinstance(here, LocalFile) and here.path.read_bytes() == b"x"
    assert isinstance(missing, InvalidRequest)
    assert isinstance(bad, ValueError)


@pytest.mark.parametrize("keys", [[], ["one"]])
def test_none_or_one_key_needs_no_pool(tmp_path: Path, keys: list[str]) -> None:
    (tmp_path / "one").write_bytes(b"1")
    main = threading.get_ident()
    seen: list[int] = []

    class Here(LocalFileStore):
        def local_file(self, key: str) -> LocalFile:
            seen.append(threading.get_ident())
            return super().local_file(key)

    assert len(local_files(Here(tmp_path), keys)) == len(keys)
    assert seen == [main] * len(keys)
