"""Enqueue live work and wait for its result without a thread per request.

Each API process pops its replies from a list of its own (``tasks.names.reply_queue``),
which workers push to: a pop takes each reply exactly once, so nothing is left behind in
Redis once delivered, and nothing is missed while the listener reconnects (the list
keeps what arrived meanwhile). The list expires ``REPLY_TTL_S`` after the last push, so
the list of an API process that died goes away by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from api.publisher import BoundedPublisher
from api.registry import WorkerRegistry
from configs.settings import Settings
from tasks.errors import ClientGone, GatewayTimeout, LanewayError, QueueFull, ServiceUnavailable
from tasks.names import LIVE, cancelled_key, queue_name, reply_queue, task_name
from tasks.publish import celery_message
from tasks.replies import ERROR, Reply, decode_reply

log = logging.getLogger(__name__)

POP_MAX = 1024  # replies taken per round trip at most
BLOCK_S = 5  # an idle listener's blocking pop (a dead connection shows within this)


class LiveClient:
    def __init__(self, settings: Settings, redis: aioredis.Redis) -> None:
        self.settings = settings
        self.redis = redis
        self.registry = WorkerRegistry(redis, settings.worker_ttl_s)
        self.reply_to = uuid.uuid4().hex
        self.replies = reply_queue(self.reply_to)
        self.unmatched = 0  # replies that came after their caller stopped waiting
        self.publisher = BoundedPublisher(redis, settings.live_queue_max)
        self._pending: dict[str, asyncio.Future[Reply]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()
        # its own connection: the blocking pop must not hold one the requests need
        self._listen_client = aioredis.Redis(
            connection_pool=aioredis.ConnectionPool.from_url(
                settings.effective_redis_url,
                socket_timeout=BLOCK_S + 5,
                socket_keepalive=True,
                max_connections=1,
            )
        )

    async def start(self) -> None:
        self._listener = asyncio.create_task(self._listen(), name="laneway-replies")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._listening.wait(), timeout=5)

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
        await self._listen_client.aclose()

    async def _listen(self) -> None:
        backoff = 0.1
        while True:
            try:
                await self._listen_client.ping()
                self._listening.set()
                backoff = 0.1
                while True:
                    frames = await self._pop()
                    for frame in frames:
                        self._deliver(frame)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                log.warning("reply list unreachable (%s); reconnecting", exc)
                self._listening.clear()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _pop(self) -> list[bytes]:
        """What is on the reply list now, or (when empty) the next reply to arrive."""
        frames = await self._listen_client.lpop(self.replies, POP_MAX)
        if frames:
            return cast(list[bytes], frames)
        got = await self._listen_client.blpop([self.replies], timeout=BLOCK_S)
        return [cast(bytes, got[1])] if got else []

    def _deliver(self, frame: bytes) -> None:
        try:
            reply = decode_reply(frame)
        except ValueError:
            log.error("dropping a malformed reply frame (%d bytes)", len(frame))
            return
        future = self._pending.get(reply.request_id)
        if future is None or future.done():
            self.unmatched += 1
            return
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
    ) -> Reply:
        """Enqueue ``payload`` on the capability's live lane and return the worker's reply.

        ``disconnected`` makes an awaitable that resolves when the caller hangs up."""
        await self._check_capacity(capability, str(payload.get("model")))
        request_id = uuid.uuid4().hex
        timeout = self.settings.request_timeout_s
        now = time.time()
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            message = celery_message(
                task_name(capability, LIVE),
                [
                    {
                        **payload,
                        "id": request_id,
                        "reply_to": self.reply_to,
                        "deadline": now + timeout,
                        "sent_at": now,
                    }
                ],
                queue=queue_name(capability, LIVE),
                expires_s=timeout,
            )
            await self._enqueue(capability, message)
            reply = await self._wait(request_id, future, disconnected, timeout)
        finally:
            self._pending.pop(request_id, None)
        if reply.event == ERROR:
            raise LanewayError.from_wire(reply.header.get("error", {}))
        return reply

    async def _enqueue(self, capability: str, message: str) -> None:
        try:
            depth = await self.publisher.push(queue_name(capability, LIVE), message)
        except (RedisError, OSError) as exc:
            raise ServiceUnavailable(
                f"could not enqueue the request: {exc}", code="broker_unavailable"
            ) from exc
        if depth < 0:
            raise QueueFull(
                f"the {capability} live queue is full ({-depth} waiting); retry later",
                retry_after=1,
            )

    async def _wait(
        self,
        request_id: str,
        future: asyncio.Future[Reply],
        disconnected: Callable[[], Awaitable[Any]] | None,
        timeout: float,
    ) -> Reply:
        watcher = asyncio.ensure_future(disconnected()) if disconnected is not None else None
        waiting: set[asyncio.Future[Any]] = {future} if watcher is None else {future, watcher}
        try:
            done, _ = await asyncio.wait(
                waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            if watcher is not None:
                watcher.cancel()
        if future in done:
            return future.result()
        await self._abandon(request_id)
        if watcher is not None and watcher in done:
            raise ClientGone("client closed the request")
        raise GatewayTimeout(
            f"no result within {self.settings.request_timeout_s:g}s; the request was dropped"
        )

    async def _abandon(self, request_id: str) -> None:
        """Tell workers not to compute a request nobody is waiting for."""
        with contextlib.suppress(RedisError, OSError):
            await self.redis.set(
                cancelled_key(request_id), b"1", ex=int(self.settings.request_timeout_s) + 60
            )
