"""workers.cache: LRU order, counters, keys."""

from __future__ import annotations

import numpy as np

from workers.cache import EmbeddingCache, cache_key


def vec(x: float) -> np.ndarray:
    return np.full(4, x, dtype=np.float32)


def test_hit_and_miss_counts() -> None:
    cache = EmbeddingCache(4)
    k = cache_key("m", "hello")
    assert cache.get(k) is None
    cache.put(k, vec(1))
    got = cache.get(k)
    assert got is not None and got[0] == 1
    assert cache.get(cache_key("m", "other")) is None
    assert (cache.hits, cache.misses) == (1, 2)


def test_least_recently_used_is_evicted() -> None:
    cache = EmbeddingCache(2)
    a, b, c = (cache_key("m", s) for s in "abc")
    cache.put(a, vec(1))
    cache.put(b, vec(2))
    assert cache.get(a) is not None  # a is now the most recent
    cache.put(c, vec(3))  # evicts b
    assert len(cache) == 2
    assert cache.get(b) is None
    assert cache.get(a) is not None
    assert cache.get(c) is not None


def test_put_refreshes_recency() -> None:
    cache = EmbeddingCache(2)
    a, b, c = (cache_key("m", s) for s in "abc")
    cache.put(a, vec(1))
    cache.put(b, vec(2))
    cache.put(a, vec(9))  # update moves a to the end
    cache.put(c, vec(3))
    assert cache.get(b) is None
    got = cache.get(a)
    assert got is not None and got[0] == 9


def test_size_zero_is_off() -> None:
    assert not EmbeddingCache(0).enabled
    assert EmbeddingCache(1).enabled


def test_keys_separate_models_and_input_kinds() -> None:
    assert cache_key("m1", "x") != cache_key("m2", "x")
    assert cache_key("m", "x") == cache_key("m", "x")
    assert cache_key("m", [1, 2]) == cache_key("m", (1, 2))
    assert cache_key("m", [1, 2]) != cache_key("m", [2, 1])
    # a text and a token list never collide, even with the same bytes
    assert cache_key("m", "\x01") != cache_key("m", [1])
    assert len(cache_key("m", "x")) == 16
