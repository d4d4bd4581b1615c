"""tasks.store.usage.Usage: a generic record of units -> amounts, summed per chunk and batch."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from tasks.batches.service import usage_object
from tasks.store.models import BatchRow, ChunkRow, UsageRow
from tasks.store.usage import MAX_UNIT_CHARS, MAX_UNITS, Usage, UsageError


def test_usage_adds_unit_by_unit() -> None:
    total = (
        Usage(prompt_tokens=3, completion_tokens=4, audio_seconds=1.5)
        + Usage(prompt_tokens=2)
        + Usage(audio_seconds=0.25, images=2)
    )
    assert total == Usage(prompt_tokens=5, completion_tokens=4, audio_seconds=1.75, images=2)
    assert total.total_tokens == 9
    assert total["images"] == 2 and total["never_used"] == 0
    assert Usage.total([Usage(prompt_tokens=1), Usage(prompt_tokens=2, completion_tokens=1)]) == (
        Usage(prompt_tokens=3, completion_tokens=1)
    )
    assert Usage.total([]) == Usage()


def test_token_properties_are_zero_when_absent() -> None:
    u = Usage(audio_seconds=2.0)
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (0, 0, 0)
    assert isinstance(Usage(prompt_tokens=3).prompt_tokens, int)


def test_zero_is_no_amount_and_counts_stay_ints() -> None:
    assert Usage(prompt_tokens=0, audio_seconds=0.0) == Usage()
    assert not Usage() and Usage(images=1)
    assert Usage().as_dict() == {}
    summed = Usage(images=2) + Usage(images=3)
    assert isinstance(summed["images"], int)
    assert isinstance((Usage(images=2) + Usage(images=0.5))["images"], float)
    assert hash(Usage(images=2)) == hash(Usage(images=2))
    assert repr(Usage(b=1, a=2.5)) == "Usage(a=2.5, b=1)"


def test_round_trips_through_json() -> None:
    u = Usage(prompt_tokens=7, audio_seconds=3.25, widgets=1)
    data = json.loads(json.dumps(u.as_dict()))
    assert data == {"audio_seconds": 3.25, "prompt_tokens": 7, "widgets": 1}
    assert Usage.from_dict(data) == u
    assert list(u.as_dict()) == sorted(u.as_dict())  # stable order


@pytest.mark.parametrize(
    "data",
    [
        {"PromptTokens": 1},  # not snake_case
        {"a-b": 1},
        {"_x": 1},
        {"x__y": 1},
        {"1x": 1},
        {"": 1},
        {"x" * (MAX_UNIT_CHARS + 1): 1},
        {"total_tokens": 1},  # derived from the units: reserved
        {"input_tokens": 1},
        {1: 1},
        {"x": "1"},  # amounts are numbers
        {"x": True},
        {"x": None},
        {"x": -1},
        {"x": math.nan},
        {"x": math.inf},
        {"x": 2**63},
        {f"u{i}": 1 for i in range(MAX_UNITS + 1)},
    ],
)
def test_a_bad_record_is_refused(data: dict[Any, Any]) -> None:
    with pytest.raises(UsageError):
        Usage.from_dict(data)


def test_keyword_construction_checks_too() -> None:
    with pytest.raises(UsageError):
        Usage(BadName=1)
    with pytest.raises(UsageError):
        Usage(x=-0.5)
    with pytest.raises(UsageError):
        Usage.from_dict([("x", 1)])  # type: ignore[arg-type]
    assert Usage(**{"x" * MAX_UNIT_CHARS: 1})  # the longest name
    assert len(Usage.from_dict({f"u{i}": 1 for i in range(MAX_UNITS)})) == MAX_UNITS


def test_a_sum_past_the_bounds_is_refused() -> None:
    with pytest.raises(UsageError):
        Usage(x=2**62) + Usage(x=2**62)


def test_no_unit_is_a_column() -> None:
    """Units are rows of batch_usage: a new unit needs no migration."""
    for table in (BatchRow.__table__, ChunkRow.__table__):
        assert not {"prompt_tokens", "completion_tokens", "audio_seconds"} & set(
            table.columns.keys()
        )
    assert {"batch_id", "chunk_index", "unit", "count", "measure"} == set(
        UsageRow.__table__.columns.keys()
    )
    assert UsageRow.__table__.c.unit.type.length == MAX_UNIT_CHARS


def test_the_batch_usage_object_is_openais_then_every_other_unit() -> None:
    openai = {
        "input_tokens": 5,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 2,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 7,
    }
    assert usage_object(Usage(prompt_tokens=5, completion_tokens=2)) == openai
    both = usage_object(Usage(prompt_tokens=5, completion_tokens=2, audio_seconds=1.5))
    assert both == {**openai, "audio_seconds": 1.5}
    assert list(both)[: len(openai)] == list(openai)
    none = usage_object(Usage(audio_seconds=1.5))
    assert (none["input_tokens"], none["total_tokens"], none["audio_seconds"]) == (0, 0, 1.5)
