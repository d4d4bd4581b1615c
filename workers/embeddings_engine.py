"""One embeddings model on a worker: its backend, batcher and cache.

``submit`` takes many requests at once: one tokenizer pass over all of them, cached
vectors looked up, the rest handed to the batcher (``workers/batching.py``) with a
future per request that the batcher's thread completes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from configs.catalog import CatalogEntry
from configs.settings import Settings
from tasks.contracts.embeddings import check_dimensions
from tasks.errors import LanewayError
from tasks.queue.names import LIVE, Lane
from workers.backends import load_backend
from workers.backends.embeddings import EmbeddingBackend
from workers.batching import Batcher
from workers.cache import EmbeddingCache, cache_key
from workers.jobs import GoneCheck, JobMeta

log = logging.getLogger(__name__)


@dataclass
class EmbedCall:
    inputs: Sequence[str | Sequence[int]]
    dimensions: int | None = None


@dataclass
class EmbedResult:
    vectors: list[np.ndarray]
    prompt_tokens: int


class EmbeddingEngine:
    def __init__(
        self,
        backend: EmbeddingBackend,
        settings: Settings,
        *,
        gone: GoneCheck | None = None,
    ) -> None:
        self.entry = backend.entry
        self.backend = backend
        self.cache = EmbeddingCache(settings.embedding_cache_size)
        self.batcher = Batcher(
            backend,
            max_batch_size=settings.max_batch_size,
            token_budget=backend.entry.batch_token_budget,
            gone=gone,
            live_wait_s=settings.live_batch_wait_ms / 1000,
        )

    @classmethod
    def load(
        cls, entry: CatalogEntry, settings: Settings, *, device: str, gone: GoneCheck | None
    ) -> EmbeddingEngine:
        backend = load_backend(entry, settings, device=device, kind=EmbeddingBackend)  # type: ignore[type-abstract]
        return cls(backend, settings, gone=gone)

    @property
    def warm(self) -> bool:
        return self.backend.warm

    def stop(self) -> None:
        self.batcher.stop()

    def metrics(self) -> dict[str, Any]:
        return {
            **self.batcher.stats.snapshot(),
            "cache_hits": self.cache.hits,
            "cache_misses": self.cache.misses,
        }

    def embed(
        self,
        inputs: Sequence[str | Sequence[int]],
        *,
        dimensions: int | None = None,
        lane: Lane = LIVE,
    ) -> EmbedResult:
        """One request, waited for; raises what failed it."""
        [result] = self.embed_many([EmbedCall(inputs, dimensions)], lane=lane)
        if isinstance(result, BaseException):
            raise result
        return result

    def embed_many(
        self,
        calls: Sequence[EmbedCall],
        *,
        lane: Lane = LIVE,
        meta: Sequence[JobMeta] | None = None,
    ) -> list[EmbedResult | BaseException]:
        """Many requests, waited for: a bad request (a ``LanewayError`` before compute,
        or whatever broke its forward) fails alone."""
        outcomes: list[EmbedResult | BaseException] = []
        for future in self.submit(calls, lane=lane, meta=meta):
            try:
                outcomes.append(future.result())
            except Exception as exc:
                outcomes.append(exc)
        return outcomes

    def submit(
        self,
        calls: Sequence[EmbedCall],
        *,
        lane: Lane = LIVE,
        meta: Sequence[JobMeta] | None = None,
    ) -> list[Future[EmbedResult]]:
        """Many requests in one submission to the batcher, one job each, without waiting:
        a future per request (a ``LanewayError`` for a bad request, ``Dropped`` when its
        caller went away)."""
        cache = self.cache
        results: list[Future[EmbedResult]] = [Future() for _ in calls]
        prepared: list[tuple[int, list[list[int]], list[np.ndarray | None], list[bytes]]] = []
        for n, seqs in enumerate(self._tokenize_all(calls)):
            if isinstance(seqs, LanewayError):
                results[n].set_exception(seqs)
                continue
            inputs = calls[n].inputs
            keys = [cache_key(self.entry.id, item) for item in inputs] if cache.enabled else []
            vectors: list[np.ndarray | None] = (
                [cache.get(k) for k in keys] if cache.enabled else [None] * len(seqs)
            )
            prepared.append((n, seqs, vectors, keys))
        missing = [[i for i, v in enumerate(p[2]) if v is None] for p in prepared]
        futures = self.batcher.submit_many(
            [[p[1][i] for i in todo] for p, todo in zip(prepared, missing, strict=True)],
            lane=lane,
            meta=[meta[p[0]] for p in prepared] if meta is not None else None,
        )
        for (n, seqs, vectors, keys), todo, future in zip(prepared, missing, futures, strict=True):
            done = partial(
                _finish, results[n], cache, todo, seqs, vectors, keys, calls[n].dimensions
            )
            future.add_done_callback(done)
        return results

    def _tokenize_all(self, calls: Sequence[EmbedCall]) -> list[list[list[int]] | LanewayError]:
        """Token sequences per call, checked, in one tokenizer call when all are good
        (a call that fails is tokenized alone, so only it gets the error)."""
        backend = self.backend
        flat = [item for call in calls for item in call.inputs]
        try:
            every = backend.tokenize(flat)
        except LanewayError:
            every = None
        out: list[list[list[int]] | LanewayError] = []
        at = 0
        for call in calls:
            start, at = at, at + len(call.inputs)
            try:
                check_dimensions(backend.entry, call.dimensions)
                seqs = every[start:at] if every is not None else backend.tokenize(call.inputs)
                backend.check_lengths(seqs)
                out.append(seqs)
            except LanewayError as exc:
                out.append(exc)
        return out


def _finish(
    result: Future[EmbedResult],
    cache: EmbeddingCache,
    todo: list[int],
    seqs: list[list[int]],
    vectors: list[np.ndarray | None],
    keys: list[bytes],
    dimensions: int | None,
    computed: Future[list[Any]],
) -> None:
    """The batcher's future is done: fill in the computed vectors (and the cache)."""
    exc = computed.exception()
    if exc is not None:
        result.set_exception(exc)
        return
    for i, vec in zip(todo, computed.result(), strict=True):
        vectors[i] = vec
        if cache.enabled:
            cache.put(keys[i], vec.copy())
    result.set_result(
        EmbedResult(
            [_cut(v, dimensions) for v in vectors if v is not None], sum(len(s) for s in seqs)
        )
    )


def _cut(vec: np.ndarray, dims: int | None) -> np.ndarray:
    """A Matryoshka prefix of ``dims`` values, renormalised (the vector as is without)."""
    if dims is None or dims >= vec.shape[0]:
        return vec
    out = vec[:dims]
    return out / max(float(np.linalg.norm(out)), 1e-12)
