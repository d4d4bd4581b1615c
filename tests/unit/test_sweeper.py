"""The reaper's ``Sweeper``: the file store is swept of abandoned writes at most every
``every_s``, however often the reaper passes, with the age it was given."""

from __future__ import annotations

from pathlib import Path

from tasks.batches.reaper import ABANDONED_AFTER_S, Sweeper
from tasks.filestore import LocalFileStore


class Counting(LocalFileStore):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.ages: list[float] = []

    def sweep(self, older_than_s: float) -> int:
        self.ages.append(older_than_s)
        return super().sweep(older_than_s)


def test_sweeps_at_most_every_interval(tmp_path: Path) -> None:
    store = Counting(tmp_path)
    sweep = Sweeper(every_s=3600)
    for _ in range(5):  # reaper passes seconds apart
        sweep(store)
    assert store.ages == [ABANDONED_AFTER_S]
    sweep.swept_at -= 3600  # an interval later
    sweep(store)
    assert store.ages == [ABANDONED_AFTER_S] * 2


def test_removes_old_temporaries_and_says_how_many(tmp_path: Path) -> None:
    store = LocalFileStore(tmp_path)
    tmp = store._tmp("files/cut")
    tmp.write_bytes(b"half")
    assert Sweeper(after_s=3600)(store) == 0  # young: it could still be being written
    assert Sweeper(after_s=-1)(store) == 1
    assert not tmp.exists()
