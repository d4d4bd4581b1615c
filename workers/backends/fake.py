"""A deterministic backend with no weights: fast tests and load tests of the plumbing.

Each token id maps to a fixed pseudo-random vector; an input's embedding is the normalised
mean of its tokens' vectors, so equal inputs give equal outputs and the batching code is
exercised exactly as with a real model.

Catalog extras make it misbehave the ways real models do, for tests of the plumbing:
``forward_delay_s`` (a slow forward), ``tokenize_delay_s`` (a slow tokenizer, per input)
and ``poison_token`` (a forward holding that token id raises, as a kernel that crashes on
one input would).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import xxhash

from tasks.contracts.embeddings import EmbeddingsOptions
from tasks.errors import InvalidRequest
from workers.backends.embeddings import EmbeddingBackend

VOCAB = 1000


class FakeEmbeddingBackend(EmbeddingBackend):
    def load(self) -> None:
        rng = np.random.default_rng(0)
        self._dim = EmbeddingsOptions.of(self.entry).dimensions or 32
        self.table = rng.standard_normal((VOCAB, self._dim)).astype(np.float32)
        self.delay_s = float(self.entry.extra.get("forward_delay_s", 0.0))
        self.tokenize_delay_s = float(self.entry.extra.get("tokenize_delay_s", 0.0))
        poison = self.entry.extra.get("poison_token")
        self.poison = int(poison) if poison is not None else None

    @property
    def dimensions(self) -> int:
        return self._dim

    def tokenize(self, inputs: Sequence[str | Sequence[int]]) -> list[list[int]]:
        if self.tokenize_delay_s:
            time.sleep(self.tokenize_delay_s * len(inputs))
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
        if self.poison is not None and any(self.poison in seq for seq in batch):
            raise RuntimeError(
                f"fake kernel fault on token {self.poison} (internal detail: /srv/secret)"
            )
        out = np.stack([self.table[list(seq)].mean(axis=0) for seq in batch])
        out /= np.linalg.norm(out, axis=1, keepdims=True).clip(min=1e-9)
        return out.astype(np.float32)
