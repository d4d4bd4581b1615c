"""Celery task bodies, registered under the names in ``tasks/queue/names.py``, and the worker's
live consumer, batch runners and reaper."""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery

from configs.capabilities import REGISTRY
from configs.catalog import load_catalog
from configs.settings import Settings
from tasks.batches.reaper import Sweeper, reap
from tasks.batches.service import notify
from tasks.batches.work import BatchWork
from tasks.filestore import get_file_store
from tasks.queue.names import BATCH, LIVE, queue_name, task_name
from tasks.store.db import Backoff, database_unavailable, describe_unavailable
from workers.batch_runner import BatchRunner
from workers.live import LiveConsumer, LiveHandler, TaskEvents
from workers.runtime import WorkerRuntime

log = logging.getLogger(__name__)


def _handlers(capability: str) -> Any:
    """The capability's worker module (``live_handler`` and ``batch_executor``)."""
    return REGISTRY[capability].worker_module()


def make_live_consumer(runtime: WorkerRuntime, app: Celery | None) -> LiveConsumer:
    """The consumer of ``<capability>.live`` (see workers/live.py)."""
    settings: Settings = runtime.settings
    handler: LiveHandler = _handlers(runtime.capability).live_handler(runtime)
    return LiveConsumer(
        runtime.redis,
        queue_name=queue_name(runtime.capability, LIVE),
        task=task_name(runtime.capability, LIVE),
        handler=handler,
        events=TaskEvents(app, runtime.worker_id, enabled=settings.task_events),
        capacity=settings.live_in_flight,
        round_size=settings.max_batch_size,
    )


def make_batch_runner(runtime: WorkerRuntime) -> BatchRunner:
    settings = runtime.settings
    work = BatchWork(
        settings=settings,
        store=get_file_store(settings),
        catalog=load_catalog(settings.model_config_path),
        capability=runtime.capability,
        models=list(runtime.entries),
        execute=_handlers(runtime.capability).batch_executor(runtime),
        notify=notify,
    )
    return BatchRunner(work, threads=settings.batch_chunks_in_flight, poll_s=settings.batch_poll_s)


def register(app: Celery, runtime: WorkerRuntime, runner: BatchRunner) -> None:
    """The Celery tasks this worker runs: the batch lane's hint (live requests never
    reach Celery's consumer; the live consumer takes them)."""
    capability = runtime.capability

    # a hint that a batch has work: wake the runners and return (no pool thread waits)
    @app.task(name=task_name(capability, BATCH), ignore_result=True, acks_late=False)
    def batch(batch_id: str | None = None) -> None:
        runner.wake()


def start_reaper(
    runtime: WorkerRuntime, runner: BatchRunner, stop: threading.Event
) -> threading.Thread:
    """Every worker runs one: the database decides, so several reapers do no harm."""
    settings = runtime.settings
    store = get_file_store(settings)
    sweep = Sweeper()

    # after a failed pass (the database away) the next waits longer, up to this
    backoff = Backoff(settings.reaper_interval_s, max(settings.reaper_interval_s, 15.0))

    def loop() -> None:
        pause = settings.reaper_interval_s
        while not stop.wait(pause):
            try:
                if reap(store=store, sweep=sweep):
                    runner.wake()
                backoff.reset()
                pause = settings.reaper_interval_s
            except Exception as exc:
                pause = backoff.next()
                if database_unavailable(exc):
                    log.warning(
                        "reaper pass skipped: the database is unavailable (%s); again in %.2gs",
                        describe_unavailable(exc),
                        pause,
                    )
                else:
                    log.exception("reaper pass failed")

    thread = threading.Thread(target=loop, name="reaper", daemon=True)
    thread.start()
    return thread
