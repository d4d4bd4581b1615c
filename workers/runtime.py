"""One worker process: warm engines (one per served model), readiness and metrics in Redis.

What an engine is belongs to its capability: the capability's worker module (named in
``configs/capabilities.py``) makes one per catalog entry with ``make_engine(runtime,
entry)``, e.g. the embeddings batcher or the chat scheduler. The runtime loads them off
the main thread, reports them, answers "has this caller gone?" and stops them.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Protocol, TypeVar

import redis

from configs.capabilities import REGISTRY
from configs.catalog import CatalogEntry
from configs.settings import Settings
from tasks.contracts.base import with_article
from tasks.errors import InvalidRequest, ModelNotFound
from tasks.queue.names import (
    BATCH,
    LIVE,
    WORKERS_KEY,
    cancelled_key,
    queue_name,
    worker_metrics_key,
)
from tasks.queue.redis_client import sync_client
from workers.rolling import RollingRates, fold

log = logging.getLogger(__name__)

T = TypeVar("T")
E = TypeVar("E")  # an engine class


class Engine(Protocol):
    """A warm model and whatever schedules its work."""

    entry: CatalogEntry

    @property
    def warm(self) -> bool: ...

    def stop(self) -> None: ...

    def metrics(self) -> dict[str, Any]:
        """Numbers for the API's /metrics (JSON-able)."""
        ...


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
        self.redis = sync_client(settings.effective_redis_url, socket_timeout=10)
        self.engines: dict[str, Engine] = {}
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Publish readiness (not warm yet), then load and warm every model."""
        self.publish_readiness()
        self._heartbeat = threading.Thread(target=self._beat_loop, name="heartbeat", daemon=True)
        self._heartbeat.start()
        make: Callable[[WorkerRuntime, CatalogEntry], Engine] = (
            REGISTRY[self.capability].worker_module().make_engine
        )
        for entry in self.entries.values():
            started = time.perf_counter()
            self.engines[entry.id] = off_main_thread(
                partial(make, self, entry), name=f"load-{entry.id}"
            )
            log.info("%s warm in %.1fs", entry.id, time.perf_counter() - started)
            self.publish_readiness()

    def stop(self) -> None:
        self._stop.set()
        for engine in self.engines.values():
            engine.stop()
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
            "models": {mid: self._model_state(mid) for mid in self.entries},
            "ts": time.time(),
        }

    def _model_state(self, model: str) -> dict[str, Any]:
        """Warm or not, and which engine runs it (``/health`` shows it)."""
        engine = self.engines.get(model)
        state: dict[str, Any] = {"warm": engine is not None and engine.warm}
        if engine is not None:
            state["engine"] = engine_name(engine)
        return state

    def metrics_snapshot(self) -> dict[str, Any]:
        models = {mid: engine.metrics() for mid, engine in self.engines.items()}
        return {"worker": self.worker_id, "device": self.device, "models": models}

    def publish_readiness(self) -> None:
        ttl = int(self.settings.worker_ttl_s) + 1
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(WORKERS_KEY, self.worker_id, json.dumps(self.readiness()))
        pipe.set(worker_metrics_key(self.worker_id), json.dumps(self.metrics_snapshot()), ex=ttl)
        pipe.execute()

    def _beat_loop(self) -> None:
        rolling = RollingRates(capability=self.capability, device=self.device)
        folded = time.monotonic()
        while not self._stop.wait(self.settings.heartbeat_s):
            try:
                self.publish_readiness()
            except (redis.RedisError, OSError) as exc:  # the next beat tries again
                log.warning("heartbeat failed: %s", exc)
            if self.settings.rolling_every_s and (
                time.monotonic() - folded >= self.settings.rolling_every_s
            ):
                folded = time.monotonic()
                self.fold_rates(rolling)

    def fold_rates(self, rolling: RollingRates) -> None:
        """Fold what the warm engines measured since the last fold into the rolling records
        (workers/rolling.py)."""
        warm = {m: e for m, e in self.engines.items() if e.warm}
        fold(
            rolling.samples(
                {m: e.metrics() for m, e in warm.items()},
                {m: engine_name(e) for m, e in warm.items()},
            )
        )

    def gone(self, request_ids: list[str]) -> set[str]:
        """The requests among ``request_ids`` whose caller hung up or timed out."""
        flags = self.redis.mget([cancelled_key(r) for r in request_ids])
        return {r for r, flag in zip(request_ids, flags, strict=True) if flag is not None}

    def engine(self, model: str) -> Engine:
        try:
            return self.engines[model]
        except KeyError:
            raise ModelNotFound(
                f"model {model!r} is not served by worker {self.worker_id}", param="model"
            ) from None

    def engine_as(self, model: str, kind: type[E]) -> E:
        """The model's engine, of the kind its capability's worker module drives
        (``ModelNotFound`` when this worker does not serve it)."""
        found = self.engine(model)
        if not isinstance(found, kind):
            raise InvalidRequest(
                f"model {model!r} is not {with_article(self.capability)} model", param="model"
            )
        return found


def engine_name(engine: Engine) -> str:
    """What runs a model: an external engine's kind (``vllm``), else its backend's class."""
    return str(getattr(engine, "kind", None) or engine.entry.backend.rpartition(":")[2])


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
