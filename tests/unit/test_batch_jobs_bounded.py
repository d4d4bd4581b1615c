"""Batch jobs that cannot loop forever, and /metrics that does not count every batch on
each scrape, over a SQLite file (the real processes: tests/integration/test_security.py).

A finalisation that raises on every try is retried after a pause that doubles, each claim
counted in the database, and past LANEWAY_CHUNK_MAX_ATTEMPTS the batch fails with
``batch_job_failed``, its chunk parts' removal owed at once."""

from __future__ import annotations

import time
from typing import Any

import pytest
from sqlalchemy import event, update

import tasks.batches.lifecycle as lifecycle
import tasks.store.db
from api.routes import ops
from configs.catalog import Catalog
from tasks.batches.lifecycle import claim_batch_job
from tasks.batches.status import FINISHED_STATUSES, OPEN_STATUSES, transition
from tasks.batches.work import BatchWork
from tasks.filestore import FileStore
from tasks.store.models import BatchRow
from tests.batch_rows import batch, jsonl, make_settings, new_batch
from tests.unit.test_batch_logic import make_row


def work(store: FileStore, catalog: Catalog, **settings: Any) -> BatchWork:
    return BatchWork(
        settings=make_settings(**settings),
        store=store,
        catalog=catalog,
        capability="embeddings",
        models=[],
        execute=lambda *a: [],
        notify=lambda *a: None,
    )


def test_a_finalisation_that_breaks_every_time_fails_the_batch(
    db: None,
    store: FileStore,
    catalog: Catalog,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runner = work(store, catalog, chunk_max_attempts=2, chunk_lease_s=0.05)
    batch_id = new_batch(runner.settings, store, jsonl(2))
    with tasks.store.db.session_scope() as s:
        assert transition(s, batch_id, "in_progress") and transition(s, batch_id, "finalizing")

    def broken(*_: Any) -> None:
        raise RuntimeError("the finaliser breaks")

    monkeypatch.setattr(lifecycle, "_plan", broken)
    tries = 0
    while (job := claim_batch_job(settings=runner.settings, capability="embeddings")) is not None:
        tries += 1
        assert tries <= 2, "claimed past LANEWAY_CHUNK_MAX_ATTEMPTS"
        with pytest.raises(RuntimeError):
            runner.run(job)
        time.sleep(0.08)  # the pause after a failure (capped at the lease here)
    row = batch(batch_id)
    assert tries == 2
    assert row.status == "failed"
    assert row.errors == [
        {
            "code": "batch_job_failed",
            "line": None,
            "message": f"finalising it failed 2 times; the batch is given up (the workers' "
            f"logs have the cause under batch {batch_id})",
            "param": None,
        }
    ]
    assert row.lease_token is not None and row.lease_until <= time.time()  # cleanup owed


def test_a_job_that_raised_is_retried_after_a_pause_that_doubles(
    db: None,
    store: FileStore,
    catalog: Catalog,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runner = work(store, catalog, chunk_max_attempts=5, chunk_lease_s=120)
    batch_id = new_batch(runner.settings, store, jsonl(2))

    def broken(*_: Any, **__: Any) -> None:
        raise RuntimeError("the validator breaks")

    monkeypatch.setattr(lifecycle, "validate_input", broken)
    pauses = []
    for attempt in (1, 2, 3):
        job = claim_batch_job(settings=runner.settings, capability="embeddings")
        assert job is not None and job.attempt == attempt
        with pytest.raises(RuntimeError):
            runner.run(job)
        pauses.append(round(batch(batch_id).lease_until - time.time()))
        with tasks.store.db.session_scope() as s:  # let the pause pass at once
            s.execute(update(BatchRow).where(BatchRow.id == batch_id).values(lease_until=0.0))
    assert pauses == [2, 4, 8]
    assert batch(batch_id).status == "validating"


def test_metrics_count_open_batches_each_scrape_and_finished_ones_seldom(
    db: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for status in (*OPEN_STATUSES, "completed", "completed", "failed"):
        make_row(status)
    monkeypatch.setattr(ops, "_finished", (float("-inf"), {}))
    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "FROM batches" in statement:
            statements.append(statement)

    engine = tasks.store.db._engine
    event.listen(engine, "before_cursor_execute", seen)
    try:
        first = ops._batch_counts()
        assert len(statements) == 2  # the open ones, and the finished ones once
        second = ops._batch_counts()
        assert len(statements) == 3  # then the open ones alone
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert first == second
    assert first == {
        **dict.fromkeys(OPEN_STATUSES, 1),
        **dict.fromkeys(FINISHED_STATUSES, 0),
        "completed": 2,
        "failed": 1,
    }
    for statement in statements:  # never a group-by over every batch
        assert "WHERE batches.status IN" in statement, statement
