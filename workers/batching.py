"""Drain many requests into one forward pass: live first, sorted by length, within budget.

Requests submit their token sequences as ``Job``s and get a future each (the live
consumer attaches callbacks to it; batch runners wait on it), resolved to the list of
the forward's outputs for its sequences, in order. The batcher knows nothing of what an
output is: any model with one output per input sequence per forward (embeddings,
rerankers, classifiers) fits, through a ``Forwarder``. One scheduler thread per
model takes what is pending, builds one forward at a time (live items alone while any
wait, else batch items by length) under the model's token budget and maximum batch size,
and completes each job once all of its items are done. Jobs whose caller has gone or
whose deadline has passed are dropped before compute.

Adaptive batching: when live requests kept arriving while the last forward ran (the lane
is under load), a live forward smaller than the maximum waits up to ``live_wait_s`` after
its oldest item arrived for more to join; on an idle lane a request starts at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from configs.catalog import CatalogEntry
from tasks.queue.names import BATCH, LIVE, Lane

log = logging.getLogger(__name__)


class Forwarder(Protocol):
    """What the batcher needs of a backend: one output per sequence, in order."""

    entry: CatalogEntry

    @property
    def max_input_tokens(self) -> int: ...

    def forward(self, batch: Sequence[Sequence[int]]) -> Iterable[Any]: ...


def failed(exc: BaseException) -> Future[Any]:
    """A future that already failed with ``exc`` (a request refused before compute)."""
    future: Future[Any] = Future()
    future.set_exception(exc)
    return future


class Dropped(Exception):
    """The job was dropped before compute (caller gone or deadline passed)."""


@dataclass(frozen=True, slots=True)
class JobMeta:
    """Who is waiting for a job: the request id (its "gone" flag) and its deadline."""

    request_id: str | None = None
    deadline: float | None = None
    sent_at: float | None = None


@dataclass(eq=False)
class Job:
    seqs: list[list[int]]
    lane: Lane
    request_id: str | None = None
    deadline: float | None = None
    sent_at: float | None = None
    future: Future[list[Any]] = field(default_factory=Future)
    out: list[Any] = field(default_factory=list)
    remaining: int = 0
    arrived: float = field(default_factory=time.monotonic)
    started: bool = False  # its first input reached a forward (queue wait recorded)


@dataclass(eq=False)
class _Item:
    job: Job
    index: int
    seq: list[int]


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


# requests younger than this skip the "has the caller gone?" look-up in Redis
FRESH_S = 0.05

GoneCheck = Callable[[list[str]], set[str]]


class Batcher:
    def __init__(
        self,
        backend: Forwarder,
        *,
        max_batch_size: int,
        token_budget: int,
        gone: GoneCheck | None = None,
        live_wait_s: float = 0.0,
    ) -> None:
        self.backend = backend
        self.max_batch_size = max_batch_size
        self.token_budget = max(token_budget, backend.max_input_tokens)
        self.gone = gone
        self.live_wait_s = live_wait_s
        self.stats = ForwardStats()
        self._live: deque[_Item] = deque()
        self._batch: list[_Item] = []
        self._cond = threading.Condition()
        self._stopped = False
        self._in_forward = False
        self._arrived_during_forward = False
        self._under_load = False
        self._thread = threading.Thread(
            target=self._loop, name=f"batcher-{backend.entry.id}", daemon=True
        )
        self._thread.start()

    def submit(
        self,
        seqs: Sequence[Sequence[int]],
        *,
        lane: Lane = LIVE,
        request_id: str | None = None,
        deadline: float | None = None,
        sent_at: float | None = None,
    ) -> Future[list[Any]]:
        """One job: its token sequences, computed together or failed together."""
        [future] = self.submit_many(
            [seqs], lane=lane, meta=[JobMeta(request_id, deadline, sent_at)]
        )
        return future

    def submit_many(
        self,
        jobs: Sequence[Sequence[Sequence[int]]],
        *,
        lane: Lane = LIVE,
        meta: Sequence[JobMeta] | None = None,
    ) -> list[Future[list[Any]]]:
        """Several jobs at once (one lock, one sort), each with its own ``meta`` (or none):
        each succeeds or fails on its own."""
        futures: list[Future[list[Any]]] = []
        items: list[_Item] = []
        metas = meta if meta is not None else [JobMeta()] * len(jobs)
        for seqs, m in zip(jobs, metas, strict=True):
            job = Job([list(s) for s in seqs], lane, m.request_id, m.deadline, m.sent_at)
            job.remaining = len(job.seqs)
            job.out = [None] * len(job.seqs)
            futures.append(job.future)
            if not job.seqs:
                job.future.set_result(job.out)
            items.extend(_Item(job, i, s) for i, s in enumerate(job.seqs))
        if not items:
            return futures
        with self._cond:
            if lane == BATCH:
                self._batch.extend(items)
                self._batch.sort(key=lambda it: len(it.seq))
            else:
                self._live.extend(items)
                self._arrived_during_forward |= self._in_forward
            self._cond.notify()
        return futures

    def run(self, seqs: Sequence[Sequence[int]], **kw: object) -> list[Any]:
        return self.submit(seqs, **kw).result()  # type: ignore[arg-type]

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=5)

    # -- scheduler -----------------------------------------------------------------------

    def _take(self) -> list[_Item]:
        """One forward's worth: the live items in arrival order or, when none is waiting,
        batch items by length."""
        picked: list[_Item] = []
        longest = 0

        def fits(item: _Item) -> bool:
            new_longest = max(longest, len(item.seq))
            return len(picked) < self.max_batch_size and (
                not picked or (len(picked) + 1) * new_longest <= self.token_budget
            )

        while self._live and fits(self._live[0]):
            item = self._live.popleft()
            picked.append(item)
            longest = max(longest, len(item.seq))
        if picked:
            # a live forward carries no batch items: filled up to the batch size it would
            # cost a live caller a whole batch forward instead of a small one
            return picked
        taken = 0
        while taken < len(self._batch) and fits(self._batch[taken]):
            item = self._batch[taken]
            picked.append(item)
            longest = max(longest, len(item.seq))
            taken += 1
        del self._batch[:taken]
        return picked

    def _drop_gone(self, items: list[_Item]) -> list[_Item]:
        now = time.time()
        jobs = {it.job for it in items}
        dead = {j for j in jobs if j.deadline is not None and j.deadline < now}
        if self.gone is not None:
            # a caller cannot have hung up on a request sent moments ago: skip the round trip
            ids = [
                j.request_id
                for j in jobs
                if j.request_id
                and j not in dead
                and (j.sent_at is None or now - j.sent_at > FRESH_S)
            ]
            if ids:
                try:
                    gone_ids = self.gone(ids)
                except Exception:  # a Redis hiccup must not stop compute
                    log.exception("could not check for departed callers")
                    gone_ids = set()
                dead |= {j for j in jobs if j.request_id in gone_ids}
        if not dead:
            return items
        for job in dead:
            if not job.future.done():
                job.future.set_exception(Dropped(job.request_id or "job"))
        with self._cond:  # purge the rest of a dropped job's items
            self._live = deque(it for it in self._live if it.job not in dead)
            self._batch = [it for it in self._batch if it.job not in dead]
        return [it for it in items if it.job not in dead]

    def _live_wait(self) -> float:
        """Seconds to hold a live forward for more requests to join (0: go now)."""
        if not self._under_load or not self._live or len(self._live) >= self.max_batch_size:
            return 0.0
        return self._live[0].job.arrived + self.live_wait_s - time.monotonic()

    def _next(self) -> list[_Item] | None:
        """The next forward's items, waiting for work (None: stopped). Holds the lock."""
        while True:
            while not self._stopped and not self._live and not self._batch:
                self._under_load = False  # the lane ran dry: the next request goes at once
                self._cond.wait()
            if self._stopped:
                return None
            wait = self._live_wait()
            if wait <= 0:
                self._in_forward, self._arrived_during_forward = True, False
                return self._take()
            self._cond.wait(wait)

    def _loop(self) -> None:
        while True:
            with self._cond:
                items = self._next()
            if items is None:
                return
            # a job that already failed (or was dropped) needs none of its other items
            items = [it for it in self._drop_gone(items) if not it.job.future.done()]
            if items:
                self._forward(items)
            with self._cond:
                self._in_forward = False
                self._under_load = self._arrived_during_forward and self.live_wait_s > 0

    def _forward(self, items: list[_Item]) -> None:
        """One forward; when it raises, split it in halves and run each again, so the
        item that breaks it fails its own job alone and every other job still gets its
        vectors (a bad request costs about 2·log2(batch) extra forwards)."""
        for job in {it.job: None for it in items if not it.job.started}:
            job.started = True
            self.stats.waited(job.lane, job.sent_at, job.arrived)
        began = time.perf_counter()
        try:
            vectors = self.backend.forward([it.seq for it in items])
        except Exception as exc:
            if len(items) == 1:
                job = items[0].job
                log.exception("forward failed for request %s", job.request_id or "(batch)")
                if not job.future.done():
                    job.future.set_exception(exc)
                return
            half = len(items) // 2
            for part in (items[:half], items[half:]):
                part = [it for it in part if not it.job.future.done()]
                if part:
                    self._forward(part)
            return
        self.stats.record(len(items), time.perf_counter() - began)
        for it, vec in zip(items, vectors, strict=True):
            job = it.job
            if job.future.done():
                continue
            job.out[it.index] = vec
            job.remaining -= 1
            if job.remaining == 0:
                job.future.set_result(job.out)
