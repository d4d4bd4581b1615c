"""Enqueue live work and wait for its result without a thread per request.

Each API process pops its replies from a list of its own (``tasks.queue.names.reply_queue``),
which workers push to: a pop takes each reply exactly once, so nothing is left behind in
Redis once delivered, and nothing is missed while the listener reconnects (the list
keeps what arrived meanwhile). The list expires ``REPLY_TTL_S`` after the last push, so
the list of an API process that died goes away by itself.

Streams (chat, audio) use the same list: a worker sends a request's events (``delta``
frames, then one ``done`` or ``error``) in order through one writer, Redis keeps a list
in push order and one listener pops it, so events arrive in the order they were sent,
none twice. Each stream frame carries a sequence number; a gap (a write the worker could
not complete) ends the stream with an error rather than a text with a hole in it. A
stream has a timeout for its first event and another between events (504).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from api.limits import charge, reserve
from api.publisher import BoundedPublisher
from api.registry import WorkerRegistry
from configs import tracing
from configs.logs import KEY_NAME, REQUEST_ID
from configs.settings import Settings
from tasks.errors import (
    ClientGone,
    GatewayTimeout,
    InternalError,
    LanewayError,
    QueueFull,
    ServiceUnavailable,
)
from tasks.queue.names import LIVE, cancelled_key, queue_name, reply_queue, task_name
from tasks.queue.publish import celery_message
from tasks.queue.redis_client import FOLLOW_S, async_client, current_master, is_sentinel
from tasks.queue.replies import DONE, ERROR, Reply, decode_reply, encode_reply

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
        self._streams: dict[str, asyncio.Queue[Reply]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._listener: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()
        # its own connection: the blocking pop must not hold one the requests need
        self._listen_client = async_client(
            settings.effective_redis_url,
            socket_timeout=BLOCK_S + 5,
            socket_keepalive=True,
            max_connections=1,
        )
        self._master: tuple[str, int] | None = None  # behind Sentinel: the one last used
        # behind Sentinel the listener looks where the master is between pops (a pop
        # blocked on a master that was just replaced would hear nothing for its length)
        sentinel = is_sentinel(settings.effective_redis_url)
        self._block_s = FOLLOW_S if sentinel else BLOCK_S

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
                self._check_master()
                self._listening.set()
                backoff = 0.1
                while True:
                    frames = await self._pop()
                    for frame in frames:
                        self._deliver(frame)
                    self._check_master()  # the pop may have followed the master elsewhere
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                log.warning("reply list unreachable (%s); reconnecting", exc)
                self._listening.clear()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    def _check_master(self) -> None:
        """After a Sentinel failover, answer every request still waiting with a 503.

        What the old master took after the new one was promoted (messages, replies) is
        gone when it rejoins as a replica; nothing tells which waiting requests lost
        theirs, and waiting out ``LANEWAY_REQUEST_TIMEOUT_S`` for them is the hang a
        failover must not cause. A reply that still comes later is dropped as unmatched;
        the caller's retry goes to the new master."""
        master = current_master(self._listen_client)
        if master is None or master == self._master:
            return
        if self._master is not None:
            waiting = [*self._pending, *self._streams]
            log.warning(
                "the Redis master moved from %s:%d to %s:%d; failing %d waiting requests",
                *self._master,
                *master,
                len(waiting),
            )
            failed = ServiceUnavailable(
                "the queue broker failed over while the request was in flight; retry it",
                code="broker_failover",
            ).to_wire()
            for request_id in waiting:
                self._deliver(encode_reply(request_id, ERROR, error=failed))
        self._master = master

    async def _pop(self) -> list[bytes]:
        """What is on the reply list now, or (when empty) the next reply to arrive."""
        frames = await self._listen_client.lpop(self.replies, POP_MAX)
        if frames:
            return cast(list[bytes], frames)
        self._check_master()  # before blocking: that pop may have followed a failover
        got = await self._listen_client.blpop([self.replies], timeout=self._block_s)
        return [cast(bytes, got[1])] if got else []

    def _deliver(self, frame: bytes) -> None:
        try:
            reply = decode_reply(frame)
        except ValueError:
            log.error("dropping a malformed reply frame (%d bytes)", len(frame))
            return
        events = self._streams.get(reply.request_id)
        if events is not None:
            events.put_nowait(reply)
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
        timeout: float | None = None,
    ) -> Reply:
        """Enqueue ``payload`` on the capability's live lane and return the worker's reply.

        ``disconnected`` makes an awaitable that resolves when the caller hangs up;
        ``timeout`` (default ``LANEWAY_REQUEST_TIMEOUT_S``) bounds the wait for the reply,
        for work whose compute grows with its input (long audio)."""
        await self._check_capacity(capability, str(payload.get("model")))
        await reserve(capability, payload)  # against the caller's tokens per minute
        request_id = uuid.uuid4().hex
        timeout = timeout or self.settings.request_timeout_s
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            await self._publish(capability, payload, request_id)
            reply = await self._wait(request_id, future, disconnected, timeout)
        finally:
            self._pending.pop(request_id, None)
        if reply.event == ERROR:
            raise LanewayError.from_wire(reply.header.get("error", {}))
        charge(reply.header.get("usage"))  # against the caller's tokens per minute
        return reply

    async def stream(
        self,
        capability: str,
        payload: dict[str, Any],
        *,
        disconnected: Callable[[], Awaitable[Any]] | None = None,
    ) -> LiveStream:
        """Enqueue a streaming request and wait for its first event: an ``error`` first
        raises (the caller answers it with its HTTP status, nothing streamed yet); else
        the stream, holding that first event. Close it when done with it."""
        await self._check_capacity(capability, str(payload.get("model")))
        await reserve(capability, payload)  # against the caller's tokens per minute
        request_id = uuid.uuid4().hex
        events: asyncio.Queue[Reply] = asyncio.Queue()
        self._streams[request_id] = events
        stream = LiveStream(self, request_id, events)
        wait = self.settings.stream_first_event_timeout_s
        first = asyncio.ensure_future(stream.next(wait))
        try:
            await self._publish(capability, {**payload, "stream": True}, request_id)
            stream.first = await self._wait(request_id, first, disconnected, wait + 1)
        except BaseException:
            first.cancel()
            await stream.close()
            raise
        if stream.first.event == ERROR:
            await stream.close()
            raise LanewayError.from_wire(stream.first.header.get("error", {}))
        return stream

    async def _publish(self, capability: str, payload: dict[str, Any], request_id: str) -> None:
        """Put the request on the capability's live lane; with tracing on, inside a
        producer span whose context the message carries to the worker."""
        if tracing.TRACER is None:
            await self._enqueue(capability, self._message(capability, payload, request_id))
            return
        with tracing.publish_span(queue_name(capability, LIVE), request_id):
            message = self._message(capability, payload, request_id, tracing.inject())
            await self._enqueue(capability, message)

    def _message(
        self,
        capability: str,
        payload: dict[str, Any],
        request_id: str,
        trace: dict[str, str] | None = None,
    ) -> str:
        timeout = self.settings.request_timeout_s
        now = time.time()
        return celery_message(
            task_name(capability, LIVE),
            [
                {
                    **payload,
                    "id": request_id,
                    # the caller's request id (X-Request-ID), for the worker's log
                    "request_id": REQUEST_ID.get(),
                    "key_name": KEY_NAME.get(),
                    "reply_to": self.reply_to,
                    "deadline": now + timeout,
                    "sent_at": now,
                }
            ],
            queue=queue_name(capability, LIVE),
            expires_s=timeout,
            trace=trace,
        )

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

    def _forget(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    async def _abandon(self, request_id: str) -> None:
        """Tell workers not to compute a request nobody is waiting for."""
        with contextlib.suppress(RedisError, OSError):
            await self.redis.set(
                cancelled_key(request_id), b"1", ex=int(self.settings.request_timeout_s) + 60
            )


@dataclass(eq=False)
class LiveStream:
    """One streaming request's events, in order; ``first`` is the one already received."""

    client: LiveClient
    request_id: str
    events: asyncio.Queue[Reply]
    first: Reply | None = None
    finished: bool = False
    _seq: int = field(default=0)

    async def next(self, timeout: float | None = None) -> Reply:
        """The next event (a ``delta``, or the final ``done``/``error``); raises
        ``GatewayTimeout`` when none comes within ``timeout`` (the idle timeout by
        default) and ``InternalError`` on a gap in the sequence."""
        wait = self.client.settings.stream_idle_timeout_s if timeout is None else timeout
        try:
            reply = await asyncio.wait_for(self.events.get(), wait)
        except TimeoutError:
            raise GatewayTimeout(
                f"the stream sent no event for {wait:g}s; the request was dropped"
            ) from None
        seq = reply.header.get("seq")
        if isinstance(seq, int):
            if seq != self._seq:
                log.error(
                    "stream %s: event %d arrived, %d expected", self.request_id, seq, self._seq
                )
                raise InternalError.for_request(self.request_id)
            self._seq += 1
        if reply.event in (DONE, ERROR):
            self.finished = True
        if reply.event == DONE:
            charge(reply.header.get("usage"))  # against the caller's tokens per minute
        return reply

    def close_soon(self) -> None:
        """``close`` from code that must not wait (a cancelled response)."""
        self.client._forget(self.request_id)
        if not self.finished:
            task = asyncio.get_running_loop().create_task(self.client._abandon(self.request_id))
            self.client._background.add(task)
            task.add_done_callback(self.client._background.discard)

    async def close(self) -> None:
        """Stop listening; a stream that did not finish is flagged for the worker, which
        stops generating for it within a few steps and frees its slot."""
        self.client._forget(self.request_id)
        if not self.finished:
            await self.client._abandon(self.request_id)
