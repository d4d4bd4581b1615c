"""An LRU cache of embeddings keyed by a fast hash of (model, input)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import xxhash


def cache_key(model: str, item: str | Sequence[int]) -> bytes:
    h = xxhash.xxh3_128(model.encode())
    if isinstance(item, str):
        h.update(b"\x00s")
        h.update(item.encode("utf-8", "surrogatepass"))
    else:
        h.update(b"\x00t")
        h.update(np.asarray(item, dtype=np.int64).tobytes())
    return h.digest()


class EmbeddingCache:
    def __init__(self, size: int) -> None:
        self.size = size
        self._data: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.size > 0

    def get(self, key: bytes) -> np.ndarray | None:
        with self._lock:
            value = self._data.get(key)
            if value is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: bytes, value: np.ndarray) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)
