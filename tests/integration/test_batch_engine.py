"""The batch engine in-process, against a real database (SQLite, or a fresh Postgres
database with LANEWAY_TEST_DATABASE_URL) and a real file store: claims, fenced commits,
leases and their heartbeats, finalisers racing each other, expiry and cancellation.

Here the tests play the workers: ``BatchWork.drain()`` is what a worker's batch runners
do, one job at a time, and an executor stands in for the model. The same engine runs
under real Celery workers in test_batches.py, test_batch_faults.py and
test_batch_load.py.
"""

from __future__ import annotations

import contextlib
import errno
import json
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from sqlalchemy import update
from sqlalchemy.orm import sessionmaker

import tasks.store.db
from configs.catalog import Catalog
from configs.settings import Settings
from tasks.batches import leftovers, lifecycle, status
from tasks.batches.chunks import (
    ChunkClaim,
    ChunkResult,
    claim_chunk,
    commit_chunk,
    compute_chunk,
    run_chunk,
)
from tasks.batches.leases import Heartbeat
from tasks.batches.lifecycle import BatchJob, claim_batch_job, finalize
from tasks.batches.lines import Outcome
from tasks.batches.reaper import reap
from tasks.batches.service import describe, describe_all, request_cancel
from tasks.batches.usage import batch_usage
from tasks.batches.work import BatchWork
from tasks.filestore import FileStore, LocalFileStore
from tasks.store.db import make_engine, migrate, session_scope
from tasks.store.files import delete_file, get_file, list_files
from tasks.store.models import BatchRow, ChunkRow, FileRow
from tasks.store.usage import Usage
from tests.batch_rows import (
    FAKE,
    MINILM,
    batch,
    chunks,
    jsonl,
    line,
    make_settings,
    new_batch,
)
from tests.harness import TestDatabase

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def db(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, postgres_server_url: str | None
) -> Iterator[TestDatabase]:
    """``tasks.store.db.session_scope`` bound to a fresh, migrated database."""
    database = TestDatabase(tmp_path / "db", postgres_server_url)
    migrate(database.url)
    engine = make_engine(database.url)
    monkeypatch.setattr(tasks.store.db, "_engine", engine)
    monkeypatch.setattr(tasks.store.db, "_sessions", sessionmaker(engine, expire_on_commit=False))
    try:
        yield database
    finally:
        engine.dispose()
        database.drop()


def fake_execute(
    model: str, bodies: list[dict[str, Any]], ids: list[str], owner: str | None = None
) -> list[Outcome]:
    """200 with a one-number 'embedding' per body, 400 for the input 'FAIL'."""
    out = []
    for body in bodies:
        if body["input"] == "FAIL":
            error = {"message": "no", "type": "invalid_request_error", "param": None, "code": "x"}
            out.append(Outcome(400, {"error": error}))
        else:
            tokens = len(body["input"].split())
            data = {"object": "list", "data": [body["input"]]}
            out.append(Outcome(200, data, Usage(prompt_tokens=tokens)))
    return out


class Hints:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def __call__(self, capability: str, batch_id: str) -> None:
        self.sent.append(batch_id)


def work(
    settings: Settings,
    store: FileStore,
    catalog: Catalog,
    execute: Callable[..., list[Outcome]] = fake_execute,
) -> BatchWork:
    return BatchWork(
        settings=settings,
        store=store,
        catalog=catalog,
        capability="embeddings",
        models=[FAKE, MINILM],
        execute=execute,
        notify=Hints(),
    )


def file_lines(store: FileStore, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    with session_scope() as s:
        key = get_file(s, file_id).storage_key
    return [json.loads(x) for x in store.path(key).read_bytes().splitlines()]


def ids_of(lines: Iterable[dict[str, Any]]) -> list[str]:
    return [x["custom_id"] for x in lines]


def assert_counts_match_files(store: FileStore, row: BatchRow) -> None:
    out, err = file_lines(store, row.output_file_id), file_lines(store, row.error_file_id)
    assert (row.request_completed, row.request_failed) == (len(out), len(err))
    assert sorted(ids_of(out + err)) == sorted(set(ids_of(out + err)))  # each once
    for file_id in (row.output_file_id, row.error_file_id):
        if file_id is not None:
            with session_scope() as s:
                info = get_file(s, file_id)
                assert info.bytes == store.path(info.storage_key).stat().st_size


# -- a batch from start to end ------------------------------------------------------------------


def test_a_batch_runs_chunk_by_chunk_and_keeps_input_order(
    db: TestDatabase, store: FileStore, catalog: Catalog
) -> None:
    settings = make_settings(chunk_lines=3)
    w = work(settings, store, catalog)
    batch_id = new_batch(settings, store, jsonl(10, fail={4, 9}), metadata={"k": "v"})
    assert w.drain(limit=1) == 1  # the validation
    row = batch(batch_id)
    assert row.status == "in_progress" and row.request_total == 10 and row.model == FAKE
    assert len(chunks(batch_id)) == 4
    assert w.notify.sent == [batch_id]  # type: ignore[attr-defined]
    w.drain(limit=1)
    row = batch(batch_id)
    assert (row.request_completed, row.request_failed) == (3, 0)  # counts move while it runs
    w.drain()
    row = batch(batch_id)
    assert row.status == "completed"
    assert row.in_progress_at and row.finalizing_at and row.completed_at
    assert (row.request_total, row.request_completed, row.request_failed) == (10, 8, 2)
    assert row.metadata_ == {"k": "v"}
    out, err = file_lines(store, row.output_file_id), file_lines(store, row.error_file_id)
    assert ids_of(out) == [f"req-{i}" for i in range(10) if i not in {4, 9}]
    assert ids_of(err) == ["req-4", "req-9"]
    for entry in out:
        assert set(entry) == {"id", "custom_id", "response", "error"}
        assert entry["id"].startswith("batch_req_") and entry["error"] is None
        assert entry["response"]["status_code"] == 200
        assert entry["response"]["request_id"].startswith("req_")
        assert entry["response"]["body"]["data"] == [f"text {entry['custom_id'][4:]}"]
    assert all(e["response"]["status_code"] == 400 for e in err)
    assert len({e["id"] for e in out + err}) == 10
    with session_scope() as s:
        usage = describe(s, row)["usage"]
    assert usage == {  # two words for each of the 8 that succeeded; OpenAI's shape exactly
        "input_tokens": 16,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 0,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 16,
    }
    assert not store.path(f"batches/{batch_id}").exists()  # chunk parts cleaned up
    assert (row.lease_token, row.lease_until) == (None, None)  # and nothing more is owed
    assert all(c.attempts == 1 for c in chunks(batch_id))
    assert_counts_match_files(store, row)


def test_a_batch_where_everything_fails_is_completed_without_output(
    db: TestDatabase, store: FileStore, catalog: Catalog
) -> None:
    settings = make_settings()
    batch_id = new_batch(settings, store, jsonl(5, fail=set(range(5))))
    work(settings, store, catalog).drain()
    row = batch(batch_id)
    assert row.status == "completed" and row.output_file_id is None
    assert len(file_lines(store, row.error_file_id)) == 5
    assert (row.request_completed, row.request_failed) == (0, 5)


def test_a_batch_where_nothing_fails_has_no_error_file(
    db: TestDatabase, store: FileStore, catalog: Catalog
) -> None:
    settings = make_settings()
    batch_id = new_batch(settings, store, jsonl(4))
    work(settings, store, catalog).drain()
    row = batch(batch_id)
    assert row.status == "completed" and row.error_file_id is None
    assert len(file_lines(store, row.output_file_id)) == 4


def test_a_bad_file_fails_the_batch_with_every_error_listed(
    db: TestDatabase, store: FileStore, catalog: Catalog
) -> None:
    settings = make_settings()
    content = line("a") + b"{oops\n" + line("a") + line("b", method="GET")
    batch_id = new_batch(settings, store, content)
    w = work(settings, store, catalog)
    w.drain()
    row = batch(batch_id)
    assert row.status == "failed" and row.failed_at is not None
    with session_scope() as s:
        obj = describe(s, row)
    assert obj["errors"]["object"] == "list"
    assert [(e["code"], e["line"]) for e in obj["errors"]["data"]] == [
        ("invalid_json_line", 2),
        ("duplicate_custom_id", 3),
        ("invalid_method", 4),
    ]
    assert chunks(row.id) == [] and w.notify.sent == []  # type: ignore[attr-defined]


def test_an_unexpected_failure_in_one_request_is_one_generic_error_line(
    db: TestDatabase, store: FileStore, catalog: Catalog, caplog: pytest.LogCaptureFixture
) -> None:
    """The executor reports a request that broke in the model as ``Outcome.internal``:
    its line says which request, never what broke; the rest of the chunk is fine."""
    settings = make_settings(chunk_lines=10)

    def execute(
        model: str, bodies: list[dict[str, Any]], ids: list[str], owner: str | None = None
    ) -> list[Outcome]:
        return [
            Outcome.internal(rid) if b["input"] == "text 1" else fake_execute(model, [b], [rid])[0]
            for b, rid in zip(bodies, ids, strict=True)
        ]

    batch_id = new_batch(settings, store, jsonl(3))
    work(settings, store, catalog, execute).drain()
    row = batch(batch_id)
    assert (row.status, row.request_completed, row.request_failed) == ("completed", 2, 1)
    [err] = file_lines(store, row.error_file_id)
    assert err["custom_id"] == "req-1" and err["response"]["status_code"] == 500
    error = err["response"]["body"]["error"]
    assert error["type"] == "server_error"
    assert err["response"]["request_id"] in error["message"]


# -- claims, fences and leases --------------------------------------------------------------------


def test_a_stale_run_never_commits(db: TestDatabase, store: FileStore, catalog: Catalog) -> None:
    """A run whose chunk was claimed again meanwhile (its lease lapsed: the worker froze)
    discards its results; the later run's count is the only one."""
    settings = make_settings(chunk_lines=10)
    w = work(settings, store, catalog)
    batch_id = new_batch(settings, store, jsonl(3))
    w.drain(limit=1)  # validation
    (chunk,) = chunks(batch_id)

    def overtaken(
        model: str, bodies: list[dict[str, Any]], ids: list[str], owner: str | None = None
    ) -> list[Outcome]:
        with session_scope() as s:  # the reaper put it back and another worker claimed it
            s.execute(update(ChunkRow).where(ChunkRow.id == chunk.id).values(attempts=2))
        return fake_execute(model, bodies, ids)

    claim = claim_chunk(settings=settings, capability="embeddings", models=[FAKE])
    assert claim is not None and claim.attempt == 1
    assert not run_chunk(claim, settings=settings, store=store, execute=overtaken)
    (chunk,) = chunks(batch_id)
    assert chunk.state == "running" and chunk.attempts == 2 and chunk.result_key is None
    row = batch(batch_id)
    assert row.status == "in_progress" and row.request_completed == 0
    assert list(store.path(f"batches/{batch_id}").iterdir()) == []
    assert w.drain() == 0  # the new owner's lease runs: nobody else may take it
    with session_scope() as s:  # that owner dies: its lease runs out
        s.execute(update(ChunkRow).where(ChunkRow.id == chunk.id).values(lease_until=0))
    assert reap(store=store) == 1
    w.drain()
    row = batch(batch_id)
    assert row.status == "completed" and row.request_completed == 3
    assert ids_of(file_lines(store, row.output_file_id)) == ["req-0", "req-1", "req-2"]
    assert chunks(batch_id)[0].attempts == 3
    with session_scope() as s:  # and its usage once: two words a line
        assert batch_usage(s, batch_id) == Usage(prompt_tokens=6)


def test_a_chunk_delivered_too_often_fails_its_requests(
    db: TestDatabase, store: FileStore, catalog: Catalog
) -> None:
    settings = make_settings(chunk_lines=10, chunk_max_attempts=2)
    w = work(settings, store, catalog)
    batch_id = new_batch(settings, store, jsonl(3))
    w.drain(limit=1)
    with session_scope() as s:
        s.execute(update(ChunkRow).where(ChunkRow.batch_id == batch_id).values(attempts=2))

    def poison(
        model: str, bodies: list[dict[str, Any]], ids: list[str], owner: str | None = None
    ) -> list[Outcome]:
        raise AssertionError("a chunk past its attempts must not run again")

    work(settings, store, catalog, poison).drain()
    row = batch(batch_id)
    assert row.status == "completed" and row.output_file_id is None
    err = file_lines(store, row.error_file_id)
    assert [e["response"]["body"]["error"]["code"] for e in err] == ["chunk_failed"] * 3
    assert chunks(batch_id)[0].state == "failed"


def test_a_run_that_breaks_gives_its_chunk_back_at_once(
    db: TestDatabase, store: FileStore, catalog: Catalog
) -> None:
    settings = make_settings(chunk_lines=10, chunk_max_attempts=3)
    batch_id = new_batch(settings, store, jsonl(2))
    calls = []

    def flaky(
        model: str, bodies: list[dict[str, Any]], ids: list[str], owner: str | None = None
    ) -> list[Outcome]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the executor broke once")
        return fake_execute(model, bodies, ids)

    work(settings, store, catalog, flaky).drain()
    row = batch(batch_id)
    assert row.status == "completed" and row.request_completed == 2
    assert chunks(batch_id)[0].attempts == 2


def test_a_chunk_whose_worker_died_runs_again_once_its_lease_runs_out(
    db: TestDatabase, store: FileStore, catalog: Catalog
) -> None:
    settings = make_settings(chunk_lines=2, chunk_lease_s=0.5)
    w = work(settings, store, catalog)
    batch_id = new_batch(settings, store, jsonl(6))
    w.drain(limit=1)
    lost = claim_chunk(settings=settings, capability="embeddings", models=[FAKE])
    assert lost is not None  # claimed by a worker that then died: nobody renews it
    assert reap(store=store) == 0  # its lease has not run out yet
    time.sleep(0.6)
    assert reap(store=store) == 1
    w.drain()
    row = batch(batch_id)
    assert row.status == "completed" and row.request_completed == 6
    assert [c.attempts for c in chunks(batch_id)] == [2, 1, 1]


def test_a_batch_is_found_without_any_hint(
    db: TestDatabase, store: FileStore, catalog: Catalog
) -> None:
    settings = make_settings()
    batch_id = new_batch(settings, store, jsonl(4))  # nobody told a worker
    work(settings, store, catalog).drain()
    assert batch(batch_id).status == "completed"


def test_batches_run_oldest_first(db: TestDatabase, store: FileStore, catalog: Catalog) -> None:
    settings = make_settings(chunk_lines=2)
    w = work(settings, store, catalog)
    first = new_batch(settings, store, jsonl(4))
    time.sleep(1.01)  # created_at is in seconds
    second = new_batch(settings, store, jsonl(4))
    w.drain(limit=2)  # both validations first: they unblock whole batches
    assert batch(first).status == batch(second).status == "in_progress"
    w.drain(limit=3)  # two chunks of the first, then its finalisation
    assert batch(first).status == "completed"
    assert batch(second).request_completed == 0


def test_a_slow_chunk_keeps_its_lease_for_its_whole_run(
    db: TestDatabase, store: FileStore, catalog: Catalog
) -> None:
    """Compute (and tokenising, encoding, committing) that takes longer than the lease:
    the heartbeat renews it the whole time, so the reaper never takes the chunk back."""
    settings = make_settings(chunk_lines=10, chunk_lease_s=1.0)
    w = work(settings, store, catalog)
    batch_id = new_batch(settings, store, jsonl(3))
    w.drain(limit=1)
    reaped: list[int] = []

    def slow(
        model: str, bodies: list[dict[str, Any]], ids: list[str], owner: str | None = None
    ) -> list[Outcome]:
        for _ in range(6):  # 3 s, three leases, with the reaper looking all along
            time.sleep(0.5)
            reaped.append(reap(store=store))
        return fake_execute(model, bodies, ids)

    work(settings, store, catalog, slow).drain()
    row = batch(batch_id)
    assert row.status == "completed" and row.request_completed == 3
    assert reaped == [0] * 6
    assert chunks(batch_id)[0].attempts == 1


def test_a_heartbeat_whose_fence_fails_says_so(db: TestDatabase) -> None:
    answers = iter([True, False])
    with Heartbeat(lambda: next(answers), 0.05, "test") as beat:
        time.sleep(0.3)
    assert beat.lost and beat.renewals == 1


# -- cancel and expiry --------------------------------------------------------------------------


def test_cancel_keeps_finished_chunks_and_true_counts(
    db: TestDatabase, store: FileStore, catalog: Catalog
) -> None:
    settings = make_settings(chunk_lines=2)
    w = work(settings, store, catalog)
    batch_id = new_batch(settings, store, jsonl(8, fail={1}))
    w.drain(limit=2)  # validation, first chunk
    with session_scope() as s:
        request_cancel(s, batch_id)
    w.drain()
    row = batch(batch_id)
    assert row.status == "cancelled" and row.cancelled_at and row.cancelling_at
    assert (row.request_total, row.request_completed, row.request_failed) == (8, 1, 1)
    assert ids_of(file_lines(store, row.output_file_id)) == ["req-0"]
    assert ids_of(file_lines(store, row.error_file_id)) == ["req-1"]
    assert [c.state for c in chunks(batch_id)] == ["done", "cancelled", "cancelled", "cancelled"]


def test_a_cancel_waits_for_the_running_chunk_and_keeps_its_lines(
    db: TestDatabase, store: FileStore, catalog: Catalog
) -> None:
    settings = make_settings(chunk_lines=2)
    w = work(settings, store, catalog)
    batch_id = new_batch(settings, store, jsonl(6))
    w.drain(limit=1)
    claim = claim_chunk(settings=settings, capability="embeddings", models=[FAKE])
    assert claim is not None
    with session_scope() as s:
        request_cancel(s, batch_id)
    assert w.drain() == 0  # not while a chunk still runs
    assert run_chunk(claim, settings=settings, store=store, execute=fake_execute)
    w.drain()
    row = batch(batch_id)
    assert row.status == "cancelled" and row.request_completed == 2
    assert ids_of(file_lines(store, row.output_file_id)) == ["req-0", "req-1"]


def test_cancel_while_validating(db: TestDatabase, store: FileStore, catalog: Catalog) -> None:
    settings = make_settings()
    batch_id = new_batch(settings, store, jsonl(4))
    with session_scope() as s:
        assert status.claim(s, batch_id, "validating", 60)  # a validator is at work
    with session_scope() as s:
        request_cancel(s, batch_id)
    work(settings, store, catalog).drain()
    row = batch(batch_id)
    assert row.status == "cancelled", "a validator's claim must not hold up the cancel"
    assert row.output_file_id is None and row.error_file_id is None
    assert chunks(batch_id) == []


def test_expiry_sends_unfinished_requests_to_the_error_file(
    db: TestDatabase, store: FileStore, catalog: Catalog
) -> None:
    settings = make_settings(chunk_lines=2)
    w = work(settings, store, catalog)
    batch_id = new_batch(settings, store, jsonl(7, fail={0}))
    w.drain(limit=2)
    running = claim_chunk(settings=settings, capability="embeddings", models=[FAKE])
    assert running is not None  # a chunk still computing when the window closes
    with session_scope() as s:
        s.execute(update(BatchRow).where(BatchRow.id == batch_id).values(expires_at=0))
    w.drain()
    row = batch(batch_id)
    assert row.status == "expired" and row.expired_at is not None
    assert (row.request_total, row.request_completed, row.request_failed) == (7, 1, 6)
    assert ids_of(file_lines(store, row.output_file_id)) == ["req-1"]
    err = file_lines(store, row.error_file_id)
    assert ids_of(err) == [f"req-{i}" for i in (0, 2, 3, 4, 5, 6)]
    assert err[0]["response"]["status_code"] == 400
    for entry in err[1:]:
        assert entry["response"] is None
        assert entry["error"]["code"] == "batch_expired"
    # the chunk that was running when the batch expired commits nothing
    assert not run_chunk(running, settings=settings, store=store, execute=fake_execute)
    assert batch(batch_id).request_completed == 1
    assert_counts_match_files(store, batch(batch_id))


def test_an_expiry_under_way_is_not_mistaken_for_a_finished_batch(
    db: TestDatabase, store: FileStore, catalog: Catalog
) -> None:
    """The expiry finaliser stops the unfinished chunks first; a reaper pass (advance)
    that lands just then sees no chunk pending or running. It must not take the batch to
    finalizing: that finaliser would complete it with the stopped requests in neither
    file (CI's Postgres run caught 360 of 400 requests lost this way)."""
    settings = make_settings(chunk_lines=2)
    w = work(settings, store, catalog)
    batch_id = new_batch(settings, store, jsonl(6))
    w.drain(limit=2)  # validation, one chunk
    with session_scope() as s:
        s.execute(update(BatchRow).where(BatchRow.id == batch_id).values(expires_at=0))
    job = claim_batch_job(settings=settings, capability="embeddings")
    assert job is not None and job.status == "in_progress"
    assert lifecycle._plan(job, "expired") is not None  # the chunks are stopped now
    assert lifecycle.advance() == 0
    assert batch(batch_id).status == "in_progress"
    assert finalize(job, store=store, settings=settings)
    row = batch(batch_id)
    assert (row.status, row.request_completed, row.request_failed) == ("expired", 2, 4)
    assert_counts_match_files(store, row)


def test_a_validating_batch_past_its_window_expires(
    db: TestDatabase, store: FileStore, catalog: Catalog
) -> None:
    settings = make_settings()
    batch_id = new_batch(settings, store, jsonl(4))
    with session_scope() as s:
        s.execute(update(BatchRow).where(BatchRow.id == batch_id).values(expires_at=0))
    assert work(settings, store, catalog).drain() == 0
    assert reap(store=store) == 1
    assert batch(batch_id).status == "expired"


def test_expiry_streams_the_unfinished_requests(
    db: TestDatabase, store: FileStore, catalog: Catalog
) -> None:
    """A large batch expires with nothing done: its 12 MB error file is streamed from the
    input, so the finaliser's memory stays far below the size of what it writes (what it
    holds is about one 1 MiB copy buffer, whatever the size)."""
    n = 50_000
    settings = make_settings(chunk_lines=1000, max_batch_lines=n)
    content = b"".join(line(f"request-{i:06d}-" + "x" * 40, f"t {i}") for i in range(n))
    batch_id = new_batch(settings, store, content)
    work(settings, store, catalog).drain(limit=1)  # validated; no chunk runs
    with session_scope() as s:
        s.execute(update(BatchRow).where(BatchRow.id == batch_id).values(expires_at=0))
    job = claim_batch_job(settings=settings, capability="embeddings")
    assert job is not None and job.status == "in_progress"
    tracemalloc.start()
    try:
        assert finalize(job, store=store, settings=settings)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    row = batch(batch_id)
    with session_scope() as s:
        size = get_file(s, row.error_file_id or "").bytes
    assert row.status == "expired" and row.request_failed == n
    assert size > 10_000_000
    assert peak < size / 4, f"peak {peak / 1e6:.1f} MB while writing {size / 1e6:.1f} MB"


# -- finalisers ---------------------------------------------------------------------------------


class SlowStore(LocalFileStore):
    """A file store whose assembly of result files stops between parts while ``gate`` is
    clear: a finaliser as slow as we like, frozen exactly where the race is."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gate = threading.Event()
        self.gate.set()
        self.inside = threading.Event()

    def concat(self, key: str, parts: Iterable[str]) -> int:
        def slowly() -> Iterator[str]:
            for part in parts:
                self.inside.set()
                assert self.gate.wait(30)
                yield part

        return super().concat(key, slowly())


def ready_to_finalise(settings: Settings, store: FileStore, catalog: Catalog, n: int) -> str:
    batch_id = new_batch(settings, store, jsonl(n, fail={1}))
    w = work(settings, store, catalog)
    while batch(batch_id).status != "finalizing":
        assert w.drain(limit=1) == 1
    return batch_id


def test_a_slow_finaliser_keeps_its_lease_and_nobody_else_starts(
    db: TestDatabase, tmp_path: Path, catalog: Catalog
) -> None:
    """The finaliser takes three leases' time: its heartbeat renews the lease, so other
    workers looking for work all along never start a second finaliser."""
    store = SlowStore(tmp_path / "slow")
    settings = make_settings(chunk_lines=2, chunk_lease_s=1.0)
    batch_id = ready_to_finalise(settings, store, catalog, 8)
    job = claim_batch_job(settings=settings, capability="embeddings")
    assert job is not None and job.status == "finalizing"
    store.gate.clear()
    finished: list[bool] = []
    first = threading.Thread(
        target=lambda: finished.append(finalize(job, store=store, settings=settings))
    )
    first.start()
    assert store.inside.wait(10)
    others = work(settings, store, catalog)
    for _ in range(10):  # 3 s: three leases
        time.sleep(0.3)
        assert reap(store=store) == 0
        assert others.next_job() is None, "a second finaliser started"
    store.gate.set()
    first.join(10)
    assert finished == [True]
    row = batch(batch_id)
    assert row.status == "completed"
    assert len(file_lines(store, row.output_file_id)) == 7
    assert_counts_match_files(store, row)


def test_a_finaliser_that_lost_its_lease_never_writes(
    db: TestDatabase, tmp_path: Path, catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finaliser freezes mid-assembly (its heartbeat stops, as in a paused process) past
    its lease; another worker finalises the batch and removes the parts. When the first
    wakes up it must not shorten or replace the finished output."""
    store = SlowStore(tmp_path / "slow")
    settings = make_settings(chunk_lines=2, chunk_lease_s=0.5)
    batch_id = ready_to_finalise(settings, store, catalog, 10)
    frozen = claim_batch_job(settings=settings, capability="embeddings")
    assert frozen is not None

    real_heartbeat = lifecycle._heartbeat

    def heartbeat(job: BatchJob, s: Settings) -> Heartbeat:
        if job == frozen:  # a frozen process renews nothing
            return Heartbeat(lambda: True, 3600, "frozen")
        return real_heartbeat(job, s)

    monkeypatch.setattr(lifecycle, "_heartbeat", heartbeat)
    store.gate.clear()
    outcome: list[Any] = []

    def run_frozen() -> None:
        try:
            outcome.append(finalize(frozen, store=store, settings=settings))
        except Exception as exc:
            outcome.append(exc)

    first = threading.Thread(target=run_frozen)
    first.start()
    assert store.inside.wait(10)
    time.sleep(0.6)  # its lease runs out
    second = claim_batch_job(settings=settings, capability="embeddings")
    assert second is not None and second.token != frozen.token
    store.gate.set()  # both go on: whichever way they interleave, only the second counts
    assert finalize(second, store=store, settings=settings)
    first.join(10)
    # the first lost: its fenced commit refused it, or a part it still needed was gone
    assert outcome and outcome[0] is not True, outcome
    row = batch(batch_id)
    assert row.status == "completed"
    out, err = file_lines(store, row.output_file_id), file_lines(store, row.error_file_id)
    assert ids_of(out) == [f"req-{i}" for i in range(10) if i != 1]
    assert ids_of(err) == ["req-1"]
    assert_counts_match_files(store, row)
    assert not store.path(f"batches/{batch_id}").exists()
    leftovers = store.listdir(f"results/{batch_id}")
    assert sorted(leftovers) == sorted(
        storage_key(f) for f in (row.output_file_id, row.error_file_id)
    ), "the loser's files were not removed"


def storage_key(file_id: str | None) -> str:
    with session_scope() as s:
        return get_file(s, file_id or "").storage_key


class Died(BaseException):
    """The process is killed: nothing after this line runs, no ``except`` catches it."""


class DyingStore(LocalFileStore):
    """A file store whose process dies the first time anything removes a tree: the
    finaliser has committed and not yet removed the parts."""

    died = False

    def delete_tree(self, prefix: str) -> None:
        if not self.died:
            self.died = True
            raise Died
        super().delete_tree(prefix)


def test_a_finaliser_that_dies_after_its_commit_leaves_nothing_for_good(
    db: TestDatabase, tmp_path: Path, catalog: Catalog
) -> None:
    store = DyingStore(tmp_path / "dying")
    settings = make_settings(chunk_lines=2)
    batch_id = ready_to_finalise(settings, store, catalog, 10)
    store.write_lines(f"results/{batch_id}/output-0123456789abcdef", iter([b"x\n"]))  # older
    job = claim_batch_job(settings=settings, capability="embeddings")
    assert job is not None
    with pytest.raises(Died):
        finalize(job, store=store, settings=settings)
    row = batch(batch_id)
    assert row.status == "completed" and row.lease_token == job.token  # the removal is owed
    counted = {storage_key(f) for f in (row.output_file_id, row.error_file_id)}
    assert len(store.listdir(f"batches/{batch_id}")) == 10  # five chunks' .out and .err
    assert reap(store=store) == 0 and store.path(f"batches/{batch_id}").exists()  # not yet

    with session_scope() as s:  # its lease runs out: the finaliser is not coming back
        s.execute(update(BatchRow).where(BatchRow.id == batch_id).values(lease_until=0))
    assert leftovers.remove_owed(store) == 1
    assert not store.path(f"batches/{batch_id}").exists()
    assert set(store.listdir(f"results/{batch_id}")) == counted  # the older file went
    row = batch(batch_id)
    assert (row.status, row.lease_token, row.lease_until) == ("completed", None, None)
    assert ids_of(file_lines(store, row.error_file_id)) == ["req-1"]
    assert_counts_match_files(store, row)
    assert leftovers.remove_owed(store) == 0


def test_concurrent_finishers_write_the_output_once(
    db: TestDatabase, store: FileStore, catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers look for work at the moment the last chunk of a cancelled batch stops:
    only one may finalise it, and the output holds every finished line."""
    settings = make_settings(chunk_lines=2)
    w = work(settings, store, catalog)
    batch_id = new_batch(settings, store, jsonl(8))
    w.drain(limit=3)
    with session_scope() as s:
        request_cancel(s, batch_id)
    real_concat = LocalFileStore.concat
    interleaved = threading.Event()

    def concat(self: FileStore, key: str, parts: Iterable[str]) -> int:
        if not interleaved.is_set():  # the other worker looks for work right here
            interleaved.set()
            assert work(settings, store, catalog).drain() == 0
        return real_concat(self, key, parts)

    monkeypatch.setattr(LocalFileStore, "concat", concat)
    w.drain()
    assert interleaved.is_set()
    row = batch(batch_id)
    assert row.status == "cancelled"
    assert ids_of(file_lines(store, row.output_file_id)) == ["req-0", "req-1", "req-2", "req-3"]
    assert_counts_match_files(store, row)


# -- usage ---------------------------------------------------------------------------------------


def usage_execute(
    model: str, bodies: list[dict[str, Any]], ids: list[str], owner: str | None = None
) -> list[Outcome]:
    """fake_execute, its lines also using seconds of audio and a unit nobody declared."""
    return [
        Outcome(o.status_code, o.body, o.usage + Usage(audio_seconds=0.25, widgets=3))
        if o.status_code == 200
        else o
        for o in fake_execute(model, bodies, ids)
    ]


def test_a_batch_reports_every_unit_its_lines_used(
    db: TestDatabase, store: FileStore, catalog: Catalog
) -> None:
    """Usage is summed unit by unit across chunks, whatever the unit: one made up here
    needs no column, and reaches the batch object beside OpenAI's token fields."""
    settings = make_settings(chunk_lines=3)
    batch_id = new_batch(settings, store, jsonl(10, fail={4}))
    work(settings, store, catalog, usage_execute).drain()
    with session_scope() as s:
        assert batch_usage(s, batch_id) == Usage(prompt_tokens=18, audio_seconds=2.25, widgets=27)
        [obj] = describe_all(s, [s.get(BatchRow, batch_id)])
    assert obj["status"] == "completed" and obj["request_counts"]["completed"] == 9
    assert obj["usage"] == {
        "input_tokens": 18,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 0,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 18,
        "audio_seconds": 2.25,
        "widgets": 27,
    }
    assert isinstance(obj["usage"]["widgets"], int)  # counts stay ints, measures floats


def test_concurrent_chunk_commits_lose_no_usage(
    db: TestDatabase, store: FileStore, catalog: Catalog
) -> None:
    """Workers committing different chunks of one batch at the same moment: every
    commit's counts and usage count (the rows are per chunk; no update is lost)."""
    settings = make_settings(chunk_lines=2)
    w = work(settings, store, catalog, usage_execute)
    batch_id = new_batch(settings, store, jsonl(16))
    w.drain(limit=1)  # validation: 8 chunks
    claims = [
        claim_chunk(settings=settings, capability="embeddings", models=[FAKE]) for _ in range(8)
    ]
    assert all(claims) and len({c.index for c in claims if c}) == 8
    results = [
        compute_chunk(c, settings=settings, store=store, execute=usage_execute) for c in claims if c
    ]
    start = threading.Barrier(len(results))
    committed: list[bool] = []

    def commit(claim: ChunkClaim, result: ChunkResult) -> None:
        start.wait()
        committed.append(commit_chunk(claim, result, settings=settings))

    threads = [
        threading.Thread(target=commit, args=(c, r))
        for c, r in zip(claims, results, strict=True)
        if c
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert committed == [True] * 8
    row = batch(batch_id)
    assert row.request_completed == 16
    with session_scope() as s:
        assert batch_usage(s, batch_id) == Usage(prompt_tokens=32, audio_seconds=4.0, widgets=48)
    lifecycle.advance(batch_id)  # what a worker does after its chunk's commit
    w.drain()  # the finaliser leaves the usage as the chunks recorded it
    with session_scope() as s:
        assert batch(batch_id).status == "completed"
        assert batch_usage(s, batch_id) == Usage(prompt_tokens=32, audio_seconds=4.0, widgets=48)


# -- files and batches ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["deleted", "expired"])
def test_a_running_batch_keeps_its_input_file(
    db: TestDatabase, store: FileStore, catalog: Catalog, how: str
) -> None:
    """The input file is deleted (or expires) while its batch runs: the batch still
    finishes; the file is gone for the API at once, its content once the batch is done."""
    settings = make_settings(chunk_lines=2)
    w = work(settings, store, catalog)
    batch_id = new_batch(settings, store, jsonl(6))
    input_id = batch(batch_id).input_file_id
    w.drain(limit=2)
    with session_scope() as s:
        if how == "deleted":
            delete_file(s, store=store, file_id=input_id)
        else:
            s.execute(update(FileRow).where(FileRow.id == input_id).values(expires_at=1))
    with session_scope() as s:
        with pytest.raises(Exception, match="No such File"):
            get_file(s, input_id)
        listed, _ = list_files(s, purpose=None, limit=100, order="asc", after=None)
        assert input_id not in {r.id for r in listed}
    reap(store=store)  # expires files too
    assert store.exists(f"files/{input_id}")  # not while the batch needs it
    w.drain()
    row = batch(batch_id)
    assert row.status == "completed"
    assert len(file_lines(store, row.output_file_id)) == 6
    reap(store=store)
    assert not store.exists(f"files/{input_id}")


def test_output_files_expire_relative_to_their_own_creation(
    db: TestDatabase, store: FileStore, catalog: Catalog
) -> None:
    settings = make_settings()
    batch_id = new_batch(
        settings,
        store,
        jsonl(4, fail={0}),
        output_expires_after={"anchor": "created_at", "seconds": 3600},
    )
    time.sleep(1.1)  # finishing takes a while
    work(settings, store, catalog).drain()
    row = batch(batch_id)
    assert row.status == "completed"
    with session_scope() as s:
        for file_id in (row.output_file_id, row.error_file_id):
            info = get_file(s, file_id or "")
            assert info.expires_at == info.created_at + 3600
            assert info.created_at > row.created_at


# -- a full file store ---------------------------------------------------------------------------


class FullStore(LocalFileStore):
    """A directory store whose writes under ``full_under`` fail as a full disk's do: the
    bytes go out, then the disk says ENOSPC (the store's own handling turns it into
    ``StorageFull`` and removes the temporary)."""

    full_under: str | None = None

    @contextlib.contextmanager
    def _replacing(self, key: str) -> Iterator[BinaryIO]:
        with super()._replacing(key) as out:
            yield out
            if self.full_under is not None and key.startswith(self.full_under):
                raise OSError(errno.ENOSPC, "No space left on device")

    def files_under(self, prefix: str) -> list[Path]:
        return [p for p in self.path(prefix).rglob("*") if p.is_file()]


def let_pauses_pass(batch_id: str) -> None:
    with session_scope() as s:
        s.execute(update(BatchRow).where(BatchRow.id == batch_id).values(lease_until=0))
        s.execute(
            update(ChunkRow)
            .where(ChunkRow.batch_id == batch_id, ChunkRow.state == "pending")
            .values(lease_until=0)
        )


def drain_until_finished(w: BatchWork, batch_id: str, pause_s: float) -> BatchRow:
    for _ in range(50):
        w.drain()
        if batch(batch_id).status in status.FINISHED_STATUSES:
            return batch(batch_id)
        time.sleep(pause_s)
    raise AssertionError(f"batch {batch_id} never finished: {batch(batch_id).status}")


def test_a_full_store_pauses_chunks_and_the_batch_finishes_once_space_returns(
    db: TestDatabase, tmp_path: Path, catalog: Catalog
) -> None:
    store = FullStore(tmp_path / "full")
    settings = make_settings(chunk_lines=2, chunk_max_attempts=3)
    w = work(settings, store, catalog)
    batch_id = new_batch(settings, store, jsonl(4, fail={1}))
    w.drain(limit=1)  # validated
    store.full_under = "batches/"
    w.drain()  # each chunk runs once, cannot write its parts, and is paused
    paused = chunks(batch_id)
    assert [(c.state, c.attempts) for c in paused] == [("pending", 1), ("pending", 1)]
    for chunk in paused:  # the first pause: 15 s (LANEWAY_CHUNK_LEASE_S is 120 s here)
        assert chunk.lease_until is not None and 14 < chunk.lease_until - time.time() <= 15
    assert w.drain() == 0  # nobody claims a paused chunk
    assert store.files_under("batches") == []  # nothing of the failed runs is kept
    assert batch(batch_id).status == "in_progress"

    store.full_under = None  # the operator freed space
    let_pauses_pass(batch_id)
    w.drain()
    row = batch(batch_id)
    assert (row.status, row.request_completed, row.request_failed) == ("completed", 3, 1)
    assert_counts_match_files(store, row)
    assert [c.attempts for c in chunks(batch_id)] == [2, 2]


def test_a_store_that_stays_full_fails_the_batch_saying_so(
    db: TestDatabase, tmp_path: Path, catalog: Catalog
) -> None:
    store = FullStore(tmp_path / "full")
    settings = make_settings(chunk_lines=2, chunk_max_attempts=2, chunk_lease_s=0.05)
    w = work(settings, store, catalog)
    batch_id = new_batch(settings, store, jsonl(4))
    w.drain(limit=1)
    store.full_under = "batches/"
    row = drain_until_finished(w, batch_id, 0.06)
    assert row.status == "failed" and row.output_file_id is None
    assert row.errors is not None and [e["code"] for e in row.errors] == ["storage_full"]
    assert row.errors[0]["message"].startswith("the file store is full: the results of chunk")
    assert all(c.state == "cancelled" and c.attempts <= 2 for c in chunks(batch_id))
    assert row.lease_token is not None and (row.lease_until or 0) <= time.time()  # cleanup owed


def test_a_full_store_at_finalisation_never_completes_a_short_batch(
    db: TestDatabase, tmp_path: Path, catalog: Catalog
) -> None:
    store = FullStore(tmp_path / "full")
    settings = make_settings(chunk_lines=2, chunk_max_attempts=3)
    w = work(settings, store, catalog)
    batch_id = new_batch(settings, store, jsonl(5, fail={1}))
    store.full_under = "results/"
    w.drain()  # validated, every chunk done, the finalisation cannot write the output
    row = batch(batch_id)
    assert (row.status, row.output_file_id, row.error_file_id) == ("finalizing", None, None)
    assert row.job_attempts == 1 and 14 < (row.lease_until or 0) - time.time() <= 15  # paused
    assert store.files_under("results") == []
    assert len(store.listdir(f"batches/{batch_id}")) == 6  # the parts wait for the next try
    assert w.drain() == 0

    store.full_under = None
    let_pauses_pass(batch_id)
    w.drain()
    row = batch(batch_id)
    assert (row.status, row.request_completed, row.request_failed) == ("completed", 4, 1)
    assert_counts_match_files(store, row)
    assert not store.path(f"batches/{batch_id}").exists()


def test_a_finalisation_on_a_store_that_stays_full_fails_the_batch_saying_so(
    db: TestDatabase, tmp_path: Path, catalog: Catalog
) -> None:
    store = FullStore(tmp_path / "full")
    settings = make_settings(chunk_lines=2, chunk_max_attempts=2, chunk_lease_s=0.05)
    w = work(settings, store, catalog)
    batch_id = new_batch(settings, store, jsonl(4))
    store.full_under = "results/"
    row = drain_until_finished(w, batch_id, 0.06)
    assert row.status == "failed" and row.output_file_id is None
    assert row.errors == [
        {
            "code": "storage_full",
            "line": None,
            "message": "the file store is full: the batch's output and error files could not "
            "be written after 2 tries, so the batch is given up. Free space in the file store "
            "and submit it again",
            "param": None,
        }
    ]
    assert store.files_under("results") == []
    with session_scope() as s:  # the reaper's removal of the parts is owed at once
        s.execute(update(BatchRow).where(BatchRow.id == batch_id).values(lease_until=0))
    assert leftovers.remove_owed(store) == 1
    assert not store.path(f"batches/{batch_id}").exists()
