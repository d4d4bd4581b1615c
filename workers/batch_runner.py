"""A worker's batch runners: a few threads of their own that take batch work from the
database, never a thread of the pool that live requests need.

``LANEWAY_BATCH_CHUNKS_IN_FLIGHT`` threads loop over ``BatchWork``: claim the next job
(a validation, a finalisation or a chunk), do it, and claim again; when there is none
they sleep until a hint arrives (the ``<capability>.batch`` Celery task, which returns
at once) or ``LANEWAY_BATCH_POLL_S`` passes. Their chunks go through the model's batcher
on the batch lane, so live requests still go first.
"""

from __future__ import annotations

import logging
import threading

from tasks.batches.work import BatchWork

log = logging.getLogger(__name__)


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
        while not self._stop.is_set():
            # cleared before looking, so a hint that arrives while we look is not lost
            self._wake.clear()
            try:
                job = self.work.next_job()
            except Exception:
                log.exception("could not look for batch work")
                job = None
            if job is None:
                self._wake.wait(self.poll_s)
                continue
            try:
                self.work.run(job)
            except Exception:
                log.exception("%s failed", job)
            self._wake.set()  # something may have become ready for the other runners
