"""Batch work as a worker sees it: find the next job, do it.

A worker's batch runners (``workers/batch_runner.py``) loop over ``BatchWork.next_job``
and ``BatchWork.run``: validations and finalisations first (they unblock whole batches),
then chunks, oldest batch first. Nothing is pushed at a worker; it takes a job only when
it has a runner free, so no job waits in a worker and none is ever sent twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from configs import tracing
from configs.catalog import Catalog
from configs.settings import Settings
from tasks.batches.chunks import ChunkClaim, Executor, claim_chunk, run_chunk
from tasks.batches.lifecycle import (
    BatchJob,
    advance,
    back_off,
    claim_batch_job,
    finalize,
    store_full,
    validate_batch,
)
from tasks.errors import StorageFull
from tasks.filestore import FileStore
from tasks.store.db import database_unavailable, describe_unavailable

log = logging.getLogger(__name__)

Job = BatchJob | ChunkClaim


@dataclass
class BatchWork:
    settings: Settings
    store: FileStore
    catalog: Catalog
    capability: str
    models: list[str]
    execute: Executor
    # tells the other workers of the capability that a batch has chunks to run
    notify: Callable[[str, str], object]

    def next_job(self) -> Job | None:
        return claim_batch_job(settings=self.settings, capability=self.capability) or (
            claim_chunk(settings=self.settings, capability=self.capability, models=self.models)
        )

    def run(self, job: Job) -> None:
        if isinstance(job, ChunkClaim):
            run_chunk(job, settings=self.settings, store=self.store, execute=self.execute)
            try:
                advance(job.batch_id)  # the last chunk moves its batch to finalizing
            except Exception as exc:
                if not database_unavailable(exc):
                    raise
                log.warning(
                    "batch %s not advanced (%s); a reaper will",
                    job.batch_id,
                    describe_unavailable(exc),
                )
            return
        what = "batch validate" if job.status == "validating" else "batch finalize"
        attributes = {"laneway.batch_id": job.batch_id, "laneway.attempt": job.attempt}
        try:
            with tracing.maybe(what, job.trace_context, attributes):
                self._run_batch_job(job)
        except StorageFull as exc:  # paused longer, or the batch fails saying why
            store_full(job, self.settings, exc)
        except Exception:
            try:  # counted: give_up once it has failed too often
                back_off(job, self.settings)
            except Exception as exc:  # the database away: the lease runs out instead
                log.warning("%s: not backed off (%s)", job, describe_unavailable(exc))
            raise

    def _run_batch_job(self, job: BatchJob) -> None:
        if job.status == "validating":
            moved = validate_batch(
                job, settings=self.settings, catalog=self.catalog, store=self.store
            )
            if moved == "in_progress":
                try:
                    self.notify(self.capability, job.batch_id)
                except Exception as exc:  # a hint only: other workers poll anyway
                    log.warning("could not announce batch %s: %s", job.batch_id, exc)
        else:
            finalize(job, store=self.store, settings=self.settings)

    def drain(self, limit: int | None = None) -> int:
        """Run jobs until none is left (or ``limit`` ran); returns how many ran."""
        ran = 0
        while limit is None or ran < limit:
            job = self.next_job()
            if job is None:
                break
            self.run(job)
            ran += 1
        return ran
