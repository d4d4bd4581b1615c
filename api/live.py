"""Enqueue live work and wait for its result without a thread per request.

One pub/sub subscription per API process carries every result addressed to it; a plain
GET of the result key is the fallback when a message was missed (reconnects, restarts).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from configs.settings import Settings
from tasks.errors import (
    ClientGone,
    GatewayTimeout,
    LanewayError,
    QueueFull,
    ServiceUnavailable,
)
from tasks.names import (
    LIVE,
    RESULT_CHANNEL_PREFIX,
    WORKERS_KEY,
    cancelled_key,
    queue_name,
    result_key,
    task_name,
)
from tasks.publish import celery_message

log = logging.getLogger(__name__)

FALLBACK_POLL_S = 1.0
# the bound check and the push in one atomic round trip: -depth when the queue is full
BOUNDED_PUSH = """
local depth = redis.call('LLEN', KEYS[1])
if depth >= tonumber(ARGV[2]) then return -depth end
return redis.call('LPUSH', KEYS[1], ARGV[1])
"""
REGISTRY_CACHE_S = 0.5


class WorkerRegistry:
    """Which workers are alive and warm, read from the hash workers heartbeat into."""

    def __init__(self, redis: aioredis.Redis, ttl_s: float) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self._workers: list[dict[str, Any]] = []
        self._read_at = 0.0

    async def workers(self, *, fresh: bool = False) -> list[dict[str, Any]]:
        now = time.monotonic()
        if fresh or now - self._read_at > REGISTRY_CACHE_S:
            raw = await self.redis.hgetall(WORKERS_KEY)
            alive, stale = [], []
            for key, value in raw.items():
                info = json.loads(value)
                age = time.time() - float(info.get("ts", 0))
                if age <= self.ttl_s:
                    alive.append(info)
                elif age > 10 * self.ttl_s:
                    stale.append(key)
            if stale:
                await self.redis.hdel(WORKERS_KEY, *stale)
            self._workers, self._read_at = alive, now
        return self._workers

    async def model_status(self, model: str) -> tuple[list[str], list[str]]:
        """(warm worker ids, all live worker ids) serving ``model``."""
        warm, live = [], []
        for info in await self.workers():
            state = info.get("models", {}).get(model)
            if state is None:
                continue
            live.append(info["id"])
            if state.get("warm"):
                warm.append(info["id"])
        return warm, live

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


class LiveClient:
    def __init__(self, settings: Settings, redis: aioredis.Redis) -> None:
        self.settings = settings
        self.redis = redis
        self.registry = WorkerRegistry(redis, settings.worker_ttl_s)
        self.reply_to = uuid.uuid4().hex
        self._push = redis.register_script(BOUNDED_PUSH)
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._pubsub_client = aioredis.Redis(
            connection_pool=aioredis.ConnectionPool.from_url(
                settings.effective_redis_url, socket_timeout=None, socket_keepalive=True
            )
        )

    async def start(self) -> None:
        self._listener = asyncio.create_task(self._listen(), name="laneway-results")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscribed.wait(), timeout=5)

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
        await self._pubsub_client.aclose()

    async def _listen(self) -> None:
        channel = RESULT_CHANNEL_PREFIX + self.reply_to
        backoff = 0.1
        while True:
            # its own connection with no read timeout: an idle subscription must not time
            # out and resubscribe (results published in that gap would wait for the fallback)
            pubsub = self._pubsub_client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(channel)
                self._subscribed.set()
                backoff = 0.1
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self._deliver(json.loads(message["data"]))
            except asyncio.CancelledError:
                await pubsub.aclose()
                raise
            except (RedisError, OSError) as exc:
                log.warning("result subscription lost (%s); reconnecting", exc)
                self._subscribed.clear()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    def _deliver(self, reply: dict[str, Any]) -> None:
        future = self._pending.get(reply.get("id", ""))
        if future is not None and not future.done():
            future.set_result(reply)

    async def _check_capacity(self, capability: str, model: str) -> None:
        try:
            await self.registry.require_warm(capability, model)
        except (RedisError, OSError) as exc:
            raise ServiceUnavailable(
                f"the queue broker is unreachable: {exc}", code="broker_unavailable"
            ) from exc

    async def call(
        self,
        capability: str,
        payload: dict[str, Any],
        *,
        disconnected: Callable[[], Awaitable[Any]] | None = None,
    ) -> dict[str, Any]:
        """Enqueue ``payload`` on the capability's live lane and return the worker's reply."""
        """``disconnected`` makes an awaitable that resolves when the caller hangs up."""
        await self._check_capacity(capability, str(payload.get("model")))
        request_id = uuid.uuid4().hex
        timeout = self.settings.request_timeout_s
        deadline = time.time() + timeout
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._pending[request_id] = future
        watcher = asyncio.ensure_future(disconnected()) if disconnected is not None else None
        try:
            message = celery_message(
                task_name(capability, LIVE),
                [
                    {
                        **payload,
                        "id": request_id,
                        "reply_to": self.reply_to,
                        "deadline": deadline,
                        "sent_at": time.time(),
                    }
                ],
                queue=queue_name(capability, LIVE),
                expires_s=timeout,
            )
            try:
                depth = await self._push(
                    keys=[queue_name(capability, LIVE)],
                    args=[message, self.settings.live_queue_max],
                )
            except (RedisError, OSError) as exc:
                raise ServiceUnavailable(
                    f"could not enqueue the request: {exc}", code="broker_unavailable"
                ) from exc
            if depth < 0:
                raise QueueFull(
                    f"the {capability} live queue is full ({-depth} waiting); retry later",
                    retry_after=1,
                )
            reply = await self._wait(request_id, future, watcher, deadline)
        finally:
            self._pending.pop(request_id, None)
            if watcher is not None:
                watcher.cancel()
        if not reply.get("ok"):
            raise LanewayError.from_wire(reply.get("error", {}))
        return reply

    async def _wait(
        self,
        request_id: str,
        future: asyncio.Future[dict[str, Any]],
        watcher: asyncio.Future[Any] | None,
        deadline: float,
    ) -> dict[str, Any]:
        waiting: set[asyncio.Future[Any]] = {future} if watcher is None else {future, watcher}
        while True:
            remaining = deadline - time.time()
            if remaining <= 0:
                await self._abandon(request_id)
                raise GatewayTimeout(
                    f"no result within {self.settings.request_timeout_s:g}s; the request "
                    "was dropped"
                )
            done, _ = await asyncio.wait(
                waiting,
                timeout=min(FALLBACK_POLL_S, remaining),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if future in done:
                return future.result()
            if watcher is not None and watcher in done:
                await self._abandon(request_id)
                raise ClientGone("client closed the request")
            # nothing pushed yet: maybe the message was missed, read the fallback copy
            try:
                raw = await self.redis.get(result_key(request_id))
            except (RedisError, OSError):
                raw = None
            if raw is not None:
                return dict(json.loads(raw))

    async def _abandon(self, request_id: str) -> None:
        """Tell workers not to compute a request nobody is waiting for."""
        with contextlib.suppress(RedisError, OSError):
            await self.redis.set(
                cancelled_key(request_id), b"1", ex=int(self.settings.request_timeout_s) + 60
            )
