"""Which workers are alive and warm: the hash workers heartbeat into, read at most every
``REGISTRY_CACHE_S`` per API process."""

from __future__ import annotations

import time
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from tasks.errors import ServiceUnavailable
from tasks.queue.names import WORKERS_KEY

REGISTRY_CACHE_S = 0.5


class WorkerRegistry:
    def __init__(self, redis: aioredis.Redis, ttl_s: float) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self._workers: list[dict[str, Any]] = []
        # model -> (warm worker ids, all live worker ids), rebuilt with each read
        self._by_model: dict[str, tuple[list[str], list[str]]] = {}
        self._read_at = -REGISTRY_CACHE_S

    async def workers(self, *, fresh: bool = False) -> list[dict[str, Any]]:
        now = time.monotonic()
        if fresh or now - self._read_at > REGISTRY_CACHE_S:
            raw = await self.redis.hgetall(WORKERS_KEY)
            alive, stale = [], []
            for key, value in raw.items():
                info = orjson.loads(value)
                age = time.time() - float(info.get("ts", 0))
                if age <= self.ttl_s:
                    alive.append(info)
                elif age > 10 * self.ttl_s:
                    stale.append(key)
            if stale:
                await self.redis.hdel(WORKERS_KEY, *stale)
            self._workers, self._by_model, self._read_at = alive, _by_model(alive), now
        return self._workers

    async def model_status(self, model: str) -> tuple[list[str], list[str]]:
        """(warm worker ids, all live worker ids) serving ``model``."""
        await self.workers()
        return self._by_model.get(model, ([], []))

    async def warm_counts(self) -> dict[str, int] | None:
        """The warm workers serving each model (None when Redis cannot tell: estimates
        then go by the records alone)."""
        try:
            await self.workers()
        except RedisError:
            return None
        return {model: len(warm) for model, (warm, _) in self._by_model.items()}

    async def engines(self, model: str) -> list[str]:
        """The engines (``vllm``, ``transformers``, ...) ``model``'s live workers run it on."""
        found = {
            str(state["engine"])
            for info in await self.workers()
            if isinstance(state := info.get("models", {}).get(model), dict) and state.get("engine")
        }
        return sorted(found)

    async def devices(self, model: str) -> list[str]:
        """The devices (``cpu``, ``cuda:0``, ...) ``model``'s live workers run on."""
        found = {
            str(info["device"])
            for info in await self.workers()
            if model in (info.get("models") or {}) and info.get("device")
        }
        return sorted(found)

    async def require_warm(self, capability: str, model: str) -> None:
        warm, live = await self.model_status(model)
        if warm:
            return
        if live:
            raise ServiceUnavailable(
                f"model {model!r} is loading on {len(live)} worker(s); retry shortly"
            )
        raise ServiceUnavailable(
            f"no live {capability} worker serves model {model!r}; start one with "
            f"`laneway worker --capability {capability}`",
            code="worker_unavailable",
        )


def _by_model(workers: list[dict[str, Any]]) -> dict[str, tuple[list[str], list[str]]]:
    out: dict[str, tuple[list[str], list[str]]] = {}
    for info in workers:
        for model, state in info.get("models", {}).items():
            warm, live = out.setdefault(model, ([], []))
            live.append(info["id"])
            if state.get("warm"):
                warm.append(info["id"])
    return out
