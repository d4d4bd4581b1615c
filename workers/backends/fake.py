"""A deterministic backend with no weights: fast tests and load tests of the plumbing.

Each token id maps to a fixed pseudo-random vector; an input's embedding is the normalised
mean of its tokens' vectors, so equal inputs give equal outputs and the batching code is
exercised exactly as with a real model.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import xxhash

from tasks.errors import InvalidRequest
from workers.backends.base import ModelBackend

VOCAB = 1000


class FakeEmbeddingBackend(ModelBackend):
    capabilities = ("embeddings",)

    def load(self) -> None:
        rng = np.random.default_rng(0)
        self._dim = self.entry.dimensions or 32
        self.table = rng.standard_normal((VOCAB, self._dim)).astype(np.float32)
        self.delay_s = float(self.entry.extra.get("forward_delay_s", 0.0))

    @property
    def dimensions(self) -> int:
        return self._dim

    def tokenize(self, inputs: Sequence[str | Sequence[int]]) -> list[list[int]]:
        out: list[list[int]] = []
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                ids = [xxhash.xxh32_intdigest(w.encode()) % (VOCAB - 2) + 2 for w in item.split()]
                out.append([1, *ids])
            else:
                if any(not 0 <= t < VOCAB for t in item):
                    raise InvalidRequest(f"input[{i}] has a token id outside 0..{VOCAB - 1}")
                out.append([1, *item])
        return out

    def forward(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        if self.delay_s:
            time.sleep(self.delay_s)
        out = np.stack([self.table[list(seq)].mean(axis=0) for seq in batch])
        out /= np.linalg.norm(out, axis=1, keepdims=True).clip(min=1e-9)
        return out.astype(np.float32)
