"""What every engine shares: who waits for a job, how a job is dropped, the numbers an
engine reports, and the one "has the caller gone?" check.

Every engine (the embeddings batcher, the chat schedulers, the speech scheduler) keeps
jobs of its own shape; each exposes what ``departed`` reads of it (``Watched``): its
``JobMeta``, its lane, its future and whether its answer is under way. ``departed`` names
the jobs to drop, each with the ``Dropped`` its future fails with; the engine decides when
to ask (before compute, every ``GONE_EVERY_S`` while running) and how to let go of a job
(purge its items, finish its rows, abort its sequences).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from configs.tracing import TRACE_KEY, line_context
from tasks.queue.names import LIVE, Lane

if TYPE_CHECKING:
    from opentelemetry.context import Context

log = logging.getLogger(__name__)


def failed(exc: BaseException) -> Future[Any]:
    """A future that already failed with ``exc`` (a request refused before compute)."""
    future: Future[Any] = Future()
    future.set_exception(exc)
    return future


class Dropped(Exception):
    """The job was dropped (caller gone, deadline passed, or its future failed outside)."""


@dataclass(frozen=True, slots=True)
class JobMeta:
    """Who is waiting for a job: the request id (its "gone" flag) and its deadline, and
    the trace context its forward spans are children of (None: untraced)."""

    request_id: str | None = None
    deadline: float | None = None
    sent_at: float | None = None
    trace: Context | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, request: dict[str, Any]) -> JobMeta:
        """A live request's (as the live consumer handed it over, its consumer span's
        context left under ``TRACE_KEY`` when traced)."""
        return cls(
            request["id"], request.get("deadline"), request.get("sent_at"), request.get(TRACE_KEY)
        )

    @classmethod
    def line(cls, request_id: str) -> JobMeta:
        """A batch line's (its span's context when traced: ``configs.tracing.LineSpans``)."""
        return cls(request_id, trace=line_context(request_id))


# -- numbers every engine reports -----------------------------------------------------------

# upper bounds of the histograms the worker reports: forward batch sizes, seconds a
# forward took, and seconds a request waited (from the API's send, or from its submission
# to the engine for batch work) until its compute started
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@dataclass
class Histogram:
    """Cumulative bucket counts and a sum: constant memory however long the worker lives."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = self.counts or [0] * len(self.bounds)

    def observe(self, value: float) -> None:
        self.n += 1
        self.total += value
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1

    def snapshot(self) -> dict[str, Any]:
        buckets = dict(zip(map(str, self.bounds), self.counts, strict=True))
        return {"buckets": buckets, "sum": self.total, "count": self.n}


@dataclass
class ForwardStats:
    """Per-forward numbers the worker reports to the API's /metrics (through Redis, with
    its heartbeat): batch sizes, forward seconds and queue wait per lane."""

    sizes: Histogram = field(default_factory=lambda: Histogram(BATCH_SIZE_BUCKETS))
    seconds: Histogram = field(default_factory=lambda: Histogram(SECONDS_BUCKETS))
    waits: dict[str, Histogram] = field(default_factory=dict)

    @property
    def forwards(self) -> int:
        return self.sizes.n

    @property
    def items(self) -> int:
        return int(self.sizes.total)

    def snapshot(self) -> dict[str, Any]:
        """What /metrics reads of every engine."""
        sizes = self.sizes.snapshot()
        return {
            "forwards": sizes["count"],
            "items": int(sizes["sum"]),
            "batch_size_buckets": sizes["buckets"],
            "forward_seconds": self.seconds.snapshot(),
            "queue_wait_seconds": {lane: h.snapshot() for lane, h in self.waits.items()},
        }

    def record(self, size: int, seconds: float | None = None) -> None:
        """One forward of ``size`` inputs that took ``seconds``."""
        self.sizes.observe(size)
        if seconds is not None:
            self.seconds.observe(seconds)

    def waited(self, lane: str, sent_at: float | None, arrived: float) -> None:
        """A request of ``lane`` starts compute: its wait since the API sent it
        (``sent_at``, wall clock: live requests), else since it reached the engine
        (``arrived``, ``time.monotonic``)."""
        wait = time.time() - sent_at if sent_at is not None else time.monotonic() - arrived
        self.waits.setdefault(lane, Histogram(SECONDS_BUCKETS)).observe(max(0.0, wait))


# -- callers that went away -------------------------------------------------------------------

# requests younger than this skip the "has the caller gone?" look-up in Redis
FRESH_S = 0.05
# how often an engine looks up the callers of its running (and queued) live jobs
GONE_EVERY_S = 0.05

# the request ids, among those given, whose caller hung up or timed out (one Redis round trip)
GoneCheck = Callable[[list[str]], set[str]]


class Watched(Protocol):
    """What ``departed`` reads of an engine's job."""

    @property
    def meta(self) -> JobMeta: ...

    @property
    def lane(self) -> Lane: ...

    @property
    def future(self) -> Future[Any]: ...

    @property
    def answering(self) -> bool:
        """Whether its answer is under way (a first token, its audio opened): a deadline
        is the latest start, so past it a running job is ended by its caller instead."""
        ...


J = TypeVar("J", bound=Watched)


def departed(
    jobs: Iterable[J], gone: GoneCheck | None, *, now: float | None = None
) -> dict[J, Dropped]:
    """The jobs among ``jobs`` to drop, each with the error its future fails with:

    - its future is done already: failed from outside (a chunk's timeout) or cancelled;
    - its deadline (wall clock) passed before its answer got under way (``answering``);
    - its caller hung up: a live job with a request id, sent more than ``FRESH_S`` ago
      (a caller cannot have gone moments after sending), whose id ``gone`` names. All
      of them are looked up in one call; ``gone=None`` skips the look-up (no Redis, or
      not due), and a look-up that fails counts nobody as gone (a Redis hiccup must not
      stop compute).

    Reads the jobs only: letting go of them is the engine's."""
    wall = time.time() if now is None else now
    dead: dict[J, Dropped] = {}
    ask: list[J] = []
    for job in dict.fromkeys(jobs):
        meta = job.meta
        if job.future.done():
            dead[job] = Dropped(f"{meta.request_id or 'job'}: its future is done")
        elif meta.deadline is not None and meta.deadline < wall and not job.answering:
            dead[job] = Dropped(f"{meta.request_id or 'job'}: the deadline passed")
        elif (
            gone is not None
            and meta.request_id
            and job.lane == LIVE
            and (meta.sent_at is None or wall - meta.sent_at > FRESH_S)
        ):
            ask.append(job)
    if ask and gone is not None:
        try:
            hung_up = gone([str(j.meta.request_id) for j in ask])
        except Exception as exc:
            log.warning("could not check for departed callers: %s", exc)
            return dead
        for job in ask:
            if job.meta.request_id in hung_up:
                dead[job] = Dropped(f"{job.meta.request_id}: the caller has gone")
    return dead


class Throttle:
    """``due()`` is true at most once every ``every_s`` (``force``: true now, and the
    interval starts again)."""

    def __init__(self, every_s: float = GONE_EVERY_S) -> None:
        self.every_s = every_s
        self._at = 0.0

    def due(self, *, force: bool = False) -> bool:
        now = time.monotonic()
        if not force and now - self._at < self.every_s:
            return False
        self._at = now
        return True
