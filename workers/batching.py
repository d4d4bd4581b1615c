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
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from configs import tracing
from configs.catalog import CatalogEntry
from tasks.queue.names import BATCH, LIVE, Lane
from workers.jobs import ForwardStats, GoneCheck, JobMeta, departed

log = logging.getLogger(__name__)


class Forwarder(Protocol):
    """What the batcher needs of a backend: one output per sequence, in order."""

    entry: CatalogEntry

    @property
    def max_input_tokens(self) -> int: ...

    def forward(self, batch: Sequence[Sequence[int]]) -> Iterable[Any]: ...


@dataclass(eq=False)
class Job:
    seqs: list[list[int]]
    lane: Lane
    meta: JobMeta = field(default_factory=JobMeta)
    future: Future[list[Any]] = field(default_factory=Future)
    out: list[Any] = field(default_factory=list)
    remaining: int = 0
    arrived: float = field(default_factory=time.monotonic)
    started: bool = False  # its first input reached a forward (queue wait recorded)

    @property
    def answering(self) -> bool:
        """Never before it completes: a job answers all at once, when its last item is
        computed, so its deadline holds until then (``workers.jobs.departed``)."""
        return False


@dataclass(eq=False)
class _Item:
    job: Job
    index: int
    seq: list[int]


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
            job = Job([list(s) for s in seqs], lane, m)
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
        """``items`` less those of jobs to drop (``departed``): each such job fails with
        ``Dropped`` and its other items leave the queues."""
        dead = departed((it.job for it in items), self.gone)
        if not dead:
            return items
        for job, error in dead.items():
            if not job.future.done():
                job.future.set_exception(error)
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
            items = self._drop_gone(items)
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
            self.stats.waited(job.lane, job.meta.sent_at, job.arrived)
        began = time.perf_counter()
        try:
            vectors = self.backend.forward([it.seq for it in items])
        except Exception as exc:
            if len(items) == 1:
                job = items[0].job
                log.exception("forward failed for request %s", job.meta.request_id or "(batch)")
                if not job.future.done():
                    job.future.set_exception(exc)
                return
            half = len(items) // 2
            for part in (items[:half], items[half:]):
                part = [it for it in part if not it.job.future.done()]
                if part:
                    self._forward(part)
            return
        took = time.perf_counter() - began
        self.stats.record(len(items), took)
        if tracing.TRACER is not None:
            jobs = {it.job: None for it in items}
            parents = [job.meta.trace for job in jobs]
            tracing.forward_spans(parents, took, len(items), model=self.backend.entry.id)
        for it, vec in zip(items, vectors, strict=True):
            job = it.job
            if job.future.done():
                continue
            job.out[it.index] = vec
            job.remaining -= 1
            if job.remaining == 0:
                job.future.set_result(job.out)
