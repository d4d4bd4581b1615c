"""A worker's batch runners: a few threads of their own that take batch work from the
database, never a thread of the pool that live requests need.

``LANEWAY_BATCH_CHUNKS_IN_FLIGHT`` threads loop over ``BatchWork``: claim the next job
(a validation, a finalisation or a chunk), do it, and claim again; when there is none
they sleep until a hint arrives (the ``<capability>.batch`` Celery task, which returns
at once) or ``LANEWAY_BATCH_POLL_S`` passes. Their chunks go through the model's batcher
on the batch lane, so live requests still go first.

A runner never dies of a failure: it logs it and looks again. While the database is away
(down, restarting) it looks after pauses that double up to ``MAX_PAUSE_S``, so it is back
at work within that once the database is.
"""

from __future__ import annotations

import logging
import threading

from tasks.batches.work import BatchWork
from tasks.store.db import Backoff, database_unavailable, describe_unavailable

log = logging.getLogger(__name__)

# the longest pause of a runner that found the database away
MAX_PAUSE_S = 5.0


class BatchRunner:
    def __init__(self, work: BatchWork, *, threads: int, poll_s: float) -> None:
        self.work = work
        self.poll_s = poll_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, name=f"batch-runner-{i}", daemon=True)
            for i in range(threads)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def wake(self) -> None:
        """There may be work: every idle runner looks now."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout)

    def _loop(self) -> None:
        backoff = Backoff(first_s=min(self.poll_s, 0.5), max_s=max(self.poll_s, MAX_PAUSE_S))
        while not self._stop.is_set():
            # cleared before looking, so a hint that arrives while we look is not lost
            self._wake.clear()
            try:
                job = self.work.next_job()
                backoff.reset()
            except Exception as exc:
                pause = backoff.next()
                if database_unavailable(exc):
                    log.warning(
                        "no batch work taken: the database is unavailable (%s); again in %.2gs",
                        describe_unavailable(exc),
                        pause,
                    )
                else:
                    log.exception("could not look for batch work")
                self._wake.wait(pause)
                continue
            if job is None:
                self._wake.wait(self.poll_s)
                continue
            try:
                self.work.run(job)
            except Exception:
                log.exception("%s failed", job)
            self._wake.set()  # something may have become ready for the other runners
