"""What every model backend is: weights loaded for one catalog entry on one device.

What a backend computes depends on its capability, so each capability defines its own
interface on top of this one (``workers.backends.embeddings.EmbeddingBackend``,
``workers.backends.chat.ChatBackend``) and the engine that drives it (the embeddings
batcher, the chat scheduler).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from configs.catalog import CatalogEntry


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

    @abstractmethod
    def load(self) -> None:
        """Load weights onto ``self.device``."""

    @abstractmethod
    def warmup(self) -> None:
        """Run the shapes traffic will use so the first real request pays nothing extra;
        sets ``warm``."""
