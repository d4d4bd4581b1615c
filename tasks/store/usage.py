"""What one request used, counted per Batch API line and summed per chunk and batch.

One object for every capability: tokens in (embeddings, chat), tokens out (chat) and
seconds of audio (speech). The database keeps one column per field on chunks and
batches, so a chunk's commit adds its usage to the batch's in one atomic UPDATE.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    audio_seconds: float = 0.0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.audio_seconds + other.audio_seconds,
        )

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def columns(self) -> dict[str, Any]:
        """The row columns of this usage (chunks and batches have one per field)."""
        return asdict(self)

    @classmethod
    def of_row(cls, row: Any) -> Usage:
        """The usage recorded on a chunk or batch row (NULL counts as nothing)."""
        return cls(**{f.name: getattr(row, f.name) or 0 for f in fields(cls)})

    @classmethod
    def total(cls, usages: Iterable[Usage]) -> Usage:
        out = cls()
        for usage in usages:
            out = out + usage
        return out


USAGE_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(Usage))
