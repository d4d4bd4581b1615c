"""The backend interface every model family implements.

A backend turns raw inputs into token sequences (``tokenize``), and a list of token
sequences into outputs in one forward pass (``forward``). Batching, caching, priority and
cancellation live in ``workers/batching.py`` and stay the same for every backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from configs.catalog import CatalogEntry
from tasks.errors import ContextLengthExceeded, InvalidRequest


class ModelBackend(ABC):
    capabilities: ClassVar[tuple[str, ...]] = ()

    def __init__(self, entry: CatalogEntry, *, device: str, model_path: str) -> None:
        self.entry = entry
        self.device = device
        self.model_path = model_path
        self.warm = False

    @property
    def max_input_tokens(self) -> int:
        return self.entry.max_input_tokens

    @property
    @abstractmethod
    def dimensions(self) -> int: ...

    @abstractmethod
    def load(self) -> None:
        """Load weights onto ``self.device``."""

    @abstractmethod
    def tokenize(self, inputs: Sequence[str | Sequence[int]]) -> list[list[int]]:
        """Token ids (special tokens included) for each input; no truncation."""

    @abstractmethod
    def forward(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        """One forward over the batch: float32 array (len(batch), dimensions), in order."""

    def warmup(self) -> None:
        """Run the shapes traffic will use so the first real request pays nothing extra."""
        for n, length in ((1, 8), (8, 32), (2, min(self.max_input_tokens, 128))):
            self.forward([[1] * length] * n)
        self.warm = True

    def check_lengths(self, token_seqs: Sequence[Sequence[int]], *, param: str = "input") -> None:
        for i, seq in enumerate(token_seqs):
            if len(seq) > self.max_input_tokens:
                raise ContextLengthExceeded(
                    f"This model's maximum context length is {self.max_input_tokens} tokens, "
                    f"however input[{i}] has {len(seq)} tokens. Please reduce the length of "
                    "the input.",
                    param=param,
                )
            if not seq:
                raise InvalidRequest(f"input[{i}] is empty", param=param)
