"""What one request used, counted per Batch API line and summed per chunk and batch.

A generic record of units -> amounts: tokens in and out (``prompt_tokens``,
``completion_tokens``), seconds of audio, or whatever unit a new capability counts. A
capability names its units; nothing generic does, and a new unit needs no database
migration: a batch's usage is stored as one row per (chunk, unit)
(``tasks/batches/usage.py``).

Amounts are ints (counts) or floats (measures), never negative; a zero amount is the
same as no amount. Unit names are snake_case and bounded (usage can come from a worker's
reply), and the names of the totals we report next to the units are reserved.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

Amount = int | float

UNIT_PATTERN = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")
MAX_UNIT_CHARS = 64  # also the width of the database's unit column
MAX_UNITS = 16
# ints are stored as 64-bit integers
MAX_COUNT = 2**63 - 1
# derived from the units, never units themselves: Usage.total_tokens and OpenAI's batch
# usage fields (tasks/batches/service.py reports every other unit beside them)
RESERVED = frozenset(
    {
        "total_tokens",
        "input_tokens",
        "output_tokens",
        "input_tokens_details",
        "output_tokens_details",
    }
)


class UsageError(ValueError):
    """A usage record that is not one: a bad unit name or amount, or too many units."""


def check_unit(unit: object) -> str:
    if not isinstance(unit, str) or not 0 < len(unit) <= MAX_UNIT_CHARS:
        raise UsageError(f"a usage unit is a name of 1 to {MAX_UNIT_CHARS} characters")
    if not UNIT_PATTERN.fullmatch(unit):
        raise UsageError(f"usage unit {unit!r} is not a snake_case name")
    if unit in RESERVED:
        raise UsageError(f"usage unit {unit!r} is reserved (it is derived from the units)")
    return unit


def check_amount(unit: str, amount: object) -> Amount:
    # bool is an int to Python, never an amount
    if isinstance(amount, bool) or not isinstance(amount, int | float):
        raise UsageError(f"usage {unit!r} must be a number, not {type(amount).__name__}")
    if isinstance(amount, float) and not math.isfinite(amount):
        raise UsageError(f"usage {unit!r} must be finite")
    if amount < 0 or (isinstance(amount, int) and amount > MAX_COUNT):
        raise UsageError(f"usage {unit!r} is out of range: {amount}")
    return amount


class Usage:
    """Units -> amounts; immutable. ``Usage(prompt_tokens=3)``, ``Usage(audio_seconds=1.5)``;
    ``u["unit"]`` is 0 for a unit not used; ``u + v`` adds unit by unit."""

    __slots__ = ("_amounts",)
    _amounts: dict[str, Amount]

    def __init__(self, **amounts: Amount) -> None:
        self._amounts = _checked(amounts)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Usage:
        """The usage a JSON object describes (``as_dict``'s output); raises UsageError."""
        if not isinstance(data, Mapping):
            raise UsageError("usage must be an object of units to amounts")
        out = cls.__new__(cls)
        out._amounts = _checked(data)
        return out

    def as_dict(self) -> dict[str, Amount]:
        """The units used (never a zero), sorted by name: JSON-able, ``from_dict``'s input."""
        return dict(sorted(self._amounts.items()))

    def items(self) -> Iterator[tuple[str, Amount]]:
        return iter(self.as_dict().items())

    def __getitem__(self, unit: str) -> Amount:
        return self._amounts.get(unit, 0)

    def __contains__(self, unit: object) -> bool:
        return unit in self._amounts

    def __len__(self) -> int:
        return len(self._amounts)

    def __bool__(self) -> bool:
        return bool(self._amounts)

    @property
    def prompt_tokens(self) -> int:
        return int(self["prompt_tokens"])

    @property
    def completion_tokens(self) -> int:
        return int(self["completion_tokens"])

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        if not isinstance(other, Usage):
            return NotImplemented
        amounts = dict(self._amounts)
        for unit, amount in other._amounts.items():
            amounts[unit] = amounts.get(unit, 0) + amount
        out = Usage.__new__(Usage)
        out._amounts = _checked(amounts)  # a sum may pass the bounds
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Usage):
            return NotImplemented
        return self._amounts == other._amounts

    def __hash__(self) -> int:
        return hash(frozenset(self._amounts.items()))

    def __repr__(self) -> str:
        inner = ", ".join(f"{unit}={amount!r}" for unit, amount in self.items())
        return f"Usage({inner})"

    @classmethod
    def total(cls, usages: Iterable[Usage]) -> Usage:
        out = cls()
        for usage in usages:
            out = out + usage
        return out


def _checked(amounts: Mapping[Any, Any]) -> dict[str, Amount]:
    out: dict[str, Amount] = {}
    for unit, amount in amounts.items():
        name = check_unit(unit)
        value = check_amount(name, amount)
        if value:
            out[name] = value
    if len(out) > MAX_UNITS:
        raise UsageError(f"a usage record has at most {MAX_UNITS} units, got {len(out)}")
    return out
