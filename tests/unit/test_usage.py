"""tasks.store.usage.Usage: one usage object for every capability, summed per chunk and batch."""

from __future__ import annotations

from types import SimpleNamespace

from tasks.store.models import BatchRow, ChunkRow
from tasks.store.usage import USAGE_COLUMNS, Usage


def test_usage_adds_field_by_field() -> None:
    total = Usage(3, 4, 1.5) + Usage(prompt_tokens=2) + Usage(audio_seconds=0.25)
    assert total == Usage(5, 4, 1.75)
    assert total.total_tokens == 9
    assert Usage.total([Usage(1), Usage(2, 1)]) == Usage(3, 1)
    assert Usage.total([]) == Usage()


def test_every_field_is_a_column_of_chunks_and_batches() -> None:
    for table in (BatchRow.__table__, ChunkRow.__table__):
        assert set(USAGE_COLUMNS) <= set(table.columns.keys())
    assert Usage(1, 2, 3.0).columns() == {
        "prompt_tokens": 1,
        "completion_tokens": 2,
        "audio_seconds": 3.0,
    }


def test_a_row_with_nulls_counts_as_nothing() -> None:
    row = SimpleNamespace(prompt_tokens=7, completion_tokens=None, audio_seconds=None)
    assert Usage.of_row(row) == Usage(prompt_tokens=7)
