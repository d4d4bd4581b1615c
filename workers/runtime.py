"""One worker process: warm backends, their batchers, readiness and metrics in Redis."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import numpy as np
import redis

from configs.catalog import CatalogEntry
from configs.settings import Settings
from tasks.embeddings import check_dimensions
from tasks.errors import LanewayError, ModelNotFound
from tasks.names import (
    BATCH,
    LIVE,
    WORKERS_KEY,
    Lane,
    cancelled_key,
    queue_name,
    worker_metrics_key,
)
from workers.backends import ModelBackend, backend_class
from workers.batching import BATCH_SIZE_BUCKETS, Batcher, JobMeta
from workers.cache import EmbeddingCache, cache_key

log = logging.getLogger(__name__)


@dataclass
class EmbedCall:
    inputs: Sequence[str | Sequence[int]]
    dimensions: int | None = None


@dataclass
class EmbedResult:
    vectors: list[np.ndarray]
    prompt_tokens: int


class WorkerRuntime:
    def __init__(
        self,
        settings: Settings,
        *,
        capability: str,
        device: str,
        entries: Sequence[CatalogEntry],
    ) -> None:
        self.settings = settings
        self.capability = capability
        self.device = device
        self.entries = {e.id: e for e in entries}
        self.worker_id = f"{capability}-{os.getpid()}@{socket.gethostname()}"
        self.redis = redis.Redis.from_url(settings.effective_redis_url, socket_timeout=10)
        self.backends: dict[str, ModelBackend] = {}
        self.batchers: dict[str, Batcher] = {}
        self.caches: dict[str, EmbeddingCache] = {}
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Publish readiness (not warm yet), then load and warm every model."""
        self.publish_readiness()
        self._heartbeat = threading.Thread(target=self._beat_loop, name="heartbeat", daemon=True)
        self._heartbeat.start()
        for entry in self.entries.values():
            started = time.perf_counter()
            backend = off_main_thread(partial(self._load, entry), name=f"load-{entry.id}")
            self.backends[entry.id] = backend
            self.caches[entry.id] = EmbeddingCache(self.settings.embedding_cache_size)
            self.batchers[entry.id] = Batcher(
                backend,
                max_batch_size=self.settings.max_batch_size,
                token_budget=entry.batch_token_budget,
                gone=self._gone,
                live_wait_s=self.settings.live_batch_wait_ms / 1000,
            )
            log.info("%s warm in %.1fs", entry.id, time.perf_counter() - started)
            self.publish_readiness()

    def _load(self, entry: CatalogEntry) -> ModelBackend:
        path = entry.resolve_path(auto_download=self.settings.auto_download)
        backend = backend_class(entry)(entry, device=self.device, model_path=path)
        backend.load()
        backend.warmup()
        return backend

    def stop(self) -> None:
        self._stop.set()
        for batcher in self.batchers.values():
            batcher.stop()
        try:
            self.redis.hdel(WORKERS_KEY, self.worker_id)
            self.redis.delete(worker_metrics_key(self.worker_id))
        except redis.RedisError:
            log.warning("could not withdraw readiness from Redis")

    def readiness(self) -> dict[str, Any]:
        return {
            "id": self.worker_id,
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "capability": self.capability,
            "device": self.device,
            "queues": [queue_name(self.capability, LIVE), queue_name(self.capability, BATCH)],
            "models": {
                mid: {"warm": mid in self.backends and self.backends[mid].warm}
                for mid in self.entries
            },
            "ts": time.time(),
        }

    def metrics_snapshot(self) -> dict[str, Any]:
        models: dict[str, Any] = {}
        for mid, batcher in self.batchers.items():
            buckets = batcher.stats.buckets
            cache = self.caches[mid]
            models[mid] = {
                "forwards": batcher.stats.forwards,
                "items": batcher.stats.items,
                "batch_size_buckets": dict(zip(map(str, BATCH_SIZE_BUCKETS), buckets, strict=True)),
                "cache_hits": cache.hits,
                "cache_misses": cache.misses,
            }
        return {"worker": self.worker_id, "device": self.device, "models": models}

    def publish_readiness(self) -> None:
        ttl = int(self.settings.worker_ttl_s) + 1
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(WORKERS_KEY, self.worker_id, json.dumps(self.readiness()))
        pipe.set(worker_metrics_key(self.worker_id), json.dumps(self.metrics_snapshot()), ex=ttl)
        pipe.execute()

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_s):
            try:
                self.publish_readiness()
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)

    def _gone(self, request_ids: list[str]) -> set[str]:
        flags = self.redis.mget([cancelled_key(r) for r in request_ids])
        return {r for r, flag in zip(request_ids, flags, strict=True) if flag is not None}

    # -- compute -------------------------------------------------------------------------

    def backend(self, model: str) -> ModelBackend:
        try:
            return self.backends[model]
        except KeyError:
            raise ModelNotFound(
                f"model {model!r} is not served by worker {self.worker_id}", param="model"
            ) from None

    def embed(
        self,
        model: str,
        inputs: Sequence[str | Sequence[int]],
        *,
        dimensions: int | None = None,
        lane: Lane = LIVE,
    ) -> EmbedResult:
        """One request, waited for; raises what failed it."""
        [result] = self.embed_many(model, [EmbedCall(inputs, dimensions)], lane=lane)
        if isinstance(result, BaseException):
            raise result
        return result

    def embed_many(
        self, model: str, calls: Sequence[EmbedCall], *, lane: Lane = LIVE
    ) -> list[EmbedResult | BaseException]:
        """Many requests, waited for: a bad request (a ``LanewayError`` before compute,
        or whatever broke its forward) fails alone."""
        outcomes: list[EmbedResult | BaseException] = []
        for future in self.submit_embed(model, calls, lane=lane):
            try:
                outcomes.append(future.result())
            except Exception as exc:
                outcomes.append(exc)
        return outcomes

    def submit_embed(
        self,
        model: str,
        calls: Sequence[EmbedCall],
        *,
        lane: Lane = LIVE,
        meta: Sequence[JobMeta] | None = None,
    ) -> list[Future[EmbedResult]]:
        """Many requests in one submission to the batcher, one job each, without waiting:
        one tokenizer pass over all of them, then a future per request that the batcher's
        thread completes (a ``LanewayError`` for a bad request, ``Dropped`` when its
        caller went away)."""
        backend = self.backend(model)
        cache = self.caches[model]
        results: list[Future[EmbedResult]] = [Future() for _ in calls]
        prepared: list[tuple[int, list[list[int]], list[np.ndarray | None], list[bytes]]] = []
        for n, seqs in enumerate(self._tokenize_all(backend, calls)):
            if isinstance(seqs, LanewayError):
                results[n].set_exception(seqs)
                continue
            inputs = calls[n].inputs
            keys = [cache_key(model, item) for item in inputs] if cache.enabled else []
            vectors: list[np.ndarray | None] = (
                [cache.get(k) for k in keys] if cache.enabled else [None] * len(seqs)
            )
            prepared.append((n, seqs, vectors, keys))
        missing = [[i for i, v in enumerate(p[2]) if v is None] for p in prepared]
        futures = self.batchers[model].submit_many(
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

    @staticmethod
    def _tokenize_all(
        backend: ModelBackend, calls: Sequence[EmbedCall]
    ) -> list[list[list[int]] | LanewayError]:
        """Token sequences per call, checked, in one tokenizer call when all are good
        (a call that fails is tokenized alone, so only it gets the error)."""
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


T = TypeVar("T")


def off_main_thread(fn: Callable[[], T], *, name: str) -> T:
    """``fn()`` on a thread of its own that ends when it returns.

    Model loading and warm-up run here, never on the main thread, because the only thread
    that runs forwards afterwards is the model's scheduler thread. libgomp (torch's
    OpenMP on CPU) keeps a pool of worker threads for every thread that ran a parallel
    region; the main thread's pool lives as long as the process, and with a second pool
    libgomp counts more OpenMP threads than cores and throttles their spin-wait, so each
    of a forward's parallel regions waits for a futex wake-up. Measured on 2 cores: a
    one-input MiniLM forward took 11.5 ms on the scheduler thread after a warm-up on the
    main thread, 4.6 ms when no other thread had run torch. A finished thread's pool goes
    away with it."""
    out: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return out[0]


def _finish(
    result: Future[EmbedResult],
    cache: EmbeddingCache,
    todo: list[int],
    seqs: list[list[int]],
    vectors: list[np.ndarray | None],
    keys: list[bytes],
    dimensions: int | None,
    computed: Future[np.ndarray],
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
