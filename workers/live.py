"""The live lane's consumer: many queued requests per Redis round trip, no thread each.

Live requests stay Celery protocol-2 task messages on ``<capability>.live`` (what the API
writes with ``tasks.queue.publish.celery_message``), but Celery's own consumer does not take
them: its per-message machinery (kombu message, request object, pool hand-off, trace)
costs more CPU than a small forward. Instead one ``LiveConsumer`` thread per worker

1. pops up to ``max_batch_size`` messages in one round trip (``RPOP key count``; when the
   queue is empty, a blocking ``BRPOP`` for the first), never more than the worker has
   room for (``LANEWAY_LIVE_IN_FLIGHT``), so what it cannot start waits in Redis, where
   the API's queue bound counts it;
2. decodes them in one pass and drops those whose deadline passed while they waited;
3. hands them all to the capability's ``LiveHandler`` at once, which submits them to the
   model's scheduler and returns a future per request.

A ``ReplyWriter`` thread takes finished futures as the scheduler completes them and
answers every request finished meanwhile with one pipelined write: one ``RPUSH`` of
reply frames per API process (``tasks.queue.replies``). Acknowledgement is as before: a
message counts as delivered once popped (at most once, as Celery's early ack), so a
worker killed mid-request leaves its callers to their timeout (504); a warm shutdown
stops popping and answers what it holds first.

With ``LANEWAY_TASK_EVENTS`` on, the consumer sends Celery's task events (received,
started, succeeded or failed) for each request, buffered and published once per round,
so Flower lists live requests as tasks of this worker.

With tracing on (``configs/tracing.py``), a request whose message carries a trace context
gets a consumer span from its pop to its reply; the span's context rides to the engine on
the request's ``JobMeta``, under which the engine times each forward the request rode in.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import redis
from celery import Celery

from configs import tracing
from tasks.errors import InternalError, LanewayError
from tasks.queue.names import REPLY_TTL_S, reply_queue
from tasks.queue.publish import MalformedMessage, TaskMessage, decode_message
from tasks.queue.replies import DELTA, DONE, ERROR, encode_reply
from workers.jobs import Dropped, failed

if TYPE_CHECKING:
    from opentelemetry.trace import Span

log = logging.getLogger(__name__)
REQUESTS = logging.getLogger("laneway.requests")

BLOCK_S = 1  # how long an idle pop blocks (and so how long a stop may take to be seen)
WRITE_MAX = 4096  # replies in one pipelined write at most


class StreamSink(Protocol):
    """Where a streaming request's events go before its future completes."""

    def delta(self, request: dict[str, Any], body: bytes = b"", **fields: Any) -> None:
        """One event of ``request`` (in order; call from one thread per request)."""
        ...


class LiveHandler(Protocol):
    """A capability's worker-side handling of live requests."""

    def submit(self, requests: Sequence[dict[str, Any]], sink: StreamSink) -> list[Future[Any]]:
        """Start every request (one call per round); a future each, in order. Streaming
        requests send their ``delta`` events to ``sink`` before their future completes."""
        ...

    def encode(self, request: dict[str, Any], result: Any) -> tuple[bytes, dict[str, Any]]:
        """A finished request's reply: the body the API passes on, and header fields."""
        ...


@dataclass(frozen=True, slots=True)
class LiveRequest:
    message: TaskMessage
    started: float  # time.perf_counter() when it was taken off the queue
    taken_at: float = 0.0  # time.time() then (the log's queue wait)
    span: Span | None = None  # its consumer span, when traced (ended with its reply)

    @property
    def request(self) -> dict[str, Any]:
        return self.message.request

    @property
    def request_id(self) -> str:
        return str(self.message.request["id"])


class TaskEvents:
    """Celery task events for live requests, buffered and published once per round."""

    def __init__(self, app: Celery | None, hostname: str, *, enabled: bool) -> None:
        self.enabled = enabled and app is not None
        self._lock = threading.Lock()
        self._pending = False
        self._dispatcher: Any = None
        if self.enabled and app is not None:
            self._connection = app.connection_for_write()
            self._dispatcher = app.events.Dispatcher(
                self._connection,
                hostname=hostname,
                enabled=True,
                buffer_group=["task"],
                buffer_limit=1 << 30,  # flushed per round, never by count
            )

    def _send(self, kind: str, **fields: Any) -> None:
        try:
            self._dispatcher.send(kind, **fields)
        except Exception as exc:  # events are for watching; never fail a request
            log.warning("could not buffer a %s event: %s", kind, exc)
            return
        self._pending = True

    def started(self, requests: Sequence[LiveRequest]) -> None:
        if not self.enabled:
            return
        with self._lock:
            for r in requests:
                m = r.message
                self._send(
                    "task-received",
                    uuid=m.task_id,
                    name=m.task,
                    args="[...]",
                    kwargs="{}",
                    root_id=m.task_id,
                    parent_id=None,
                    retries=0,
                    eta=None,
                    expires=m.expires,
                )
                self._send("task-started", uuid=m.task_id)  # the dispatcher adds pid

    def finished(self, request: LiveRequest, error: BaseException | None) -> None:
        if not self.enabled:
            return
        with self._lock:
            if error is None:
                runtime = time.perf_counter() - request.started
                self._send(
                    "task-succeeded", uuid=request.message.task_id, result="None", runtime=runtime
                )
            else:
                self._send(
                    "task-failed",
                    uuid=request.message.task_id,
                    exception=f"{type(error).__name__}()",
                    traceback="",
                )

    def flush(self) -> None:
        if not self.enabled:
            return
        with self._lock:
            if not self._pending:
                return
            self._pending = False
            try:
                self._dispatcher.flush()
            except Exception as exc:  # events are for watching; never fail a request
                log.warning("could not send task events: %s", exc)


@dataclass(frozen=True, slots=True)
class _Delta:
    request: dict[str, Any]
    body: bytes
    fields: dict[str, Any]


_Item = tuple[LiveRequest, Future[Any]] | _Delta


class ReplyWriter:
    """Answers finished requests: all those done since the last write, in one pipeline,
    with the events of streaming requests in the order they were sent. A streaming
    request's frames are numbered (``seq``) so that the API can tell a gap."""

    def __init__(
        self,
        client: redis.Redis,
        handler: LiveHandler,
        events: TaskEvents,
        on_written: Any,
    ) -> None:
        self.redis = client
        self.handler = handler
        self.events = events
        self.on_written = on_written
        self.replies = 0
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._seq: dict[str, int] = {}  # frames sent so far per streaming request
        self._thread = threading.Thread(target=self._loop, name="live-replies", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def put(self, request: LiveRequest, future: Future[Any]) -> None:
        """A request's future is done (called on whichever thread finished it)."""
        self._queue.put((request, future))

    def delta(self, request: dict[str, Any], body: bytes = b"", **fields: Any) -> None:
        """One event of a streaming request (``StreamSink``)."""
        self._queue.put(_Delta(request, body, fields))

    def _next_seq(self, request: dict[str, Any], *, last: bool) -> dict[str, Any]:
        if not request.get("stream"):
            return {}
        rid = str(request["id"])
        seq = self._seq.pop(rid, 0) if last else self._seq.get(rid, 0)
        if not last:
            self._seq[rid] = seq + 1
        return {"seq": seq}

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            done = [first]
            while len(done) < WRITE_MAX:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._write(done)
                    return
                done.append(item)
            self._write(done)

    def _write(self, items: list[_Item]) -> None:
        frames: dict[str, list[bytes]] = {}
        finished = 0
        for item in items:
            if isinstance(item, _Delta):
                request = item.request
                seq = self._next_seq(request, last=False)
                frame: bytes | None = encode_reply(
                    str(request["id"]), DELTA, item.body, **seq, **item.fields
                )
            else:
                finished += 1
                request = item[0].request
                frame = self._frame(*item)
            if frame is not None:
                frames.setdefault(reply_queue(str(request["reply_to"])), []).append(frame)
        if frames:
            pipe = self.redis.pipeline(transaction=False)
            for key, batch in frames.items():
                pipe.rpush(key, *batch)
                pipe.expire(key, REPLY_TTL_S)
            try:
                pipe.execute()
                self.replies += sum(len(b) for b in frames.values())
            except (redis.RedisError, OSError) as exc:  # their callers time out (504)
                log.warning("could not deliver %d live replies: %s", len(items), exc)
        self.events.flush()
        if finished:
            self.on_written(finished)

    def _frame(self, request: LiveRequest, future: Future[Any]) -> bytes | None:
        """The reply frame for one finished request (None: nobody to answer)."""
        frame, status = self._encode(request, future)
        if REQUESTS.isEnabledFor(logging.INFO):  # JSON logs only (configs.logs)
            _log_request(request, status)
        if request.span is not None:
            tracing.finish(request.span, status)
        return frame

    def _encode(self, request: LiveRequest, future: Future[Any]) -> tuple[bytes | None, str]:
        """The reply frame, and the outcome for the log (``ok``, ``dropped`` or the
        error's status code)."""
        rid = request.request_id
        seq = self._next_seq(request.request, last=True)
        error = future.exception()
        if error is None:
            try:
                body, fields = self.handler.encode(request.request, future.result())
            except Exception as exc:
                error = exc
            else:
                self.events.finished(request, None)
                return encode_reply(rid, DONE, body, **seq, **fields), "ok"
        self.events.finished(request, error)
        if isinstance(error, Dropped):
            log.info("dropped %s: caller gone", rid)
            return None, "dropped"
        if not isinstance(error, LanewayError):
            # the detail stays in this log, under the id the caller is told
            log.error("live request %s failed", rid, exc_info=error)
            error = InternalError.for_request(rid)
        return encode_reply(rid, ERROR, error=error.to_wire(), **seq), str(error.status_code)


def _log_request(request: LiveRequest, status: str) -> None:
    """One line per live request in the worker's JSON log, under the caller's request id."""
    body = request.request
    now = time.time()
    sent = body.get("sent_at")
    fields = {
        "model": body.get("model"),
        "status": status,
        "queue_wait_ms": round((request.taken_at - sent) * 1000, 3) if sent else None,
        "total_ms": round((now - sent) * 1000, 3) if sent else None,
    }
    if body.get("key_name"):  # the caller's key name (never the key)
        fields["key"] = body["key_name"]
    REQUESTS.info(
        "live request",
        extra={"request_id": body.get("request_id") or request.request_id, "fields": fields},
    )


class LiveConsumer:
    """Takes live requests off ``queue`` in rounds and starts them all at once."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        queue_name: str,
        task: str,
        handler: LiveHandler,
        events: TaskEvents,
        capacity: int,
        round_size: int,
    ) -> None:
        self.redis = client
        self.queue = queue_name
        self.task = task
        self.handler = handler
        self.events = events
        self.capacity = capacity
        self.round_size = round_size
        self.writer = ReplyWriter(client, handler, events, self._release)
        self.rounds = 0
        self.taken = 0
        self._in_flight = 0
        self._room = threading.Condition()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="live-consumer", daemon=True)

    def start(self) -> None:
        self.writer.start()
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking requests, answer the ones already taken (within ``timeout``)."""
        self._stopping.set()
        with self._room:
            self._room.notify_all()
        self._thread.join(BLOCK_S + 5)
        deadline = time.monotonic() + timeout
        with self._room:
            while self._in_flight and time.monotonic() < deadline:
                self._room.wait(max(deadline - time.monotonic(), 0.01))
            if self._in_flight:
                log.warning("stopping with %d live requests unanswered", self._in_flight)
        self.writer.stop(timeout=5)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def _release(self, n: int) -> None:
        with self._room:
            self._in_flight -= n
            self._room.notify_all()

    def _wait_room(self) -> int:
        with self._room:
            while self._in_flight >= self.capacity and not self._stopping.is_set():
                self._room.wait(0.5)
            return max(self.capacity - self._in_flight, 0)

    def _loop(self) -> None:
        backoff = 0.1
        while not self._stopping.is_set():
            room = self._wait_room()
            if not room:
                continue
            try:
                raws = self._pop(min(room, self.round_size))
                backoff = 0.1
            except (redis.RedisError, OSError) as exc:
                log.warning("live queue %s unreachable (%s); retrying", self.queue, exc)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            if raws:
                try:
                    self._dispatch(raws)
                except Exception:  # a bug must not stop the lane: its callers get a 504
                    log.exception("could not start %d live requests", len(raws))

    def _pop(self, n: int) -> list[bytes]:
        """Up to ``n`` messages, oldest first (the API pushes on the left)."""
        raws = self.redis.rpop(self.queue, n)
        if raws:
            return list(raws)  # type: ignore[arg-type]
        got = self.redis.brpop([self.queue], timeout=BLOCK_S)
        if not got:
            return []
        rest = self.redis.rpop(self.queue, n - 1) if n > 1 else None
        return [got[1], *(rest or [])]  # type: ignore[index, misc]

    def _dispatch(self, raws: list[bytes]) -> None:
        requests = self._accept(raws)
        if not requests:
            return
        with self._room:
            self._in_flight += len(requests)
        self.rounds += 1
        self.taken += len(requests)
        self.events.started(requests)
        try:
            futures = self.handler.submit([r.request for r in requests], self.writer)
        except Exception as exc:  # a handler bug: every request of the round hears of it
            log.exception("live handler failed to start %d requests", len(requests))
            futures = [failed(exc) for _ in requests]
        for request, future in zip(requests, futures, strict=True):
            future.add_done_callback(partial(self.writer.put, request))

    def _accept(self, raws: list[bytes]) -> list[LiveRequest]:
        now, started = time.time(), time.perf_counter()
        out: list[LiveRequest] = []
        for raw in raws:
            try:
                message = decode_message(raw)
            except MalformedMessage as exc:
                log.error("dropping a malformed message on %s: %s", self.queue, exc)
                continue
            request = message.request
            if (
                message.task != self.task
                or not isinstance(request.get("id"), str)
                or not (isinstance(request.get("reply_to"), str))
            ):
                log.error("dropping task %s on %s: not a live request", message.task_id, self.queue)
                continue
            deadline = request.get("deadline")
            if isinstance(deadline, int | float) and deadline < now:
                log.info("dropping %s: deadline passed before it was picked up", request["id"])
                continue
            out.append(LiveRequest(message, started, now))
        if tracing.TRACER is not None:
            out = [self._traced(r) for r in out]
        return out

    def _traced(self, request: LiveRequest) -> LiveRequest:
        """``request`` with its consumer span started, when its message carries a trace."""
        if request.message.trace is None:
            return request
        span = tracing.consume(request.request, request.message.trace, self.queue)
        return LiveRequest(request.message, request.started, request.taken_at, span)
