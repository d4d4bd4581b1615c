"""The database away, without processes: which errors mean "unavailable", the bounded
retry and backoff, the API's 503, and the batch engine's fenced commits when a commit's
answer is lost (it landed, but the connection died before saying so) or never comes.

The real thing (a Postgres of the test's own restarted and stopped under running
batches) is tests/integration/test_db_faults.py."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.exc import (
    DBAPIError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    ProgrammingError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout

import tasks.batches.chunks as chunks_module
import tasks.batches.lifecycle as lifecycle
from api import errors as api_errors
from configs.catalog import Catalog
from configs.settings import Settings
from tasks.batches.chunks import ChunkClaim, claim_chunk, run_chunk
from tasks.batches.lines import Outcome
from tasks.batches.work import BatchWork
from tasks.filestore import FileStore
from tasks.store.db import Backoff, database_unavailable, retry_unavailable, session_scope
from tasks.store.files import get_file
from tasks.store.usage import Usage
from tests.batch_rows import FAKE, MINILM, batch, chunks, jsonl, make_settings, new_batch
from workers.batch_runner import BatchRunner


def gone(statement: str = "SELECT 1") -> OperationalError:
    return OperationalError(statement, {}, Exception("server closed the connection"))


# -- what counts as unavailable ------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        gone(),
        InterfaceError("SELECT 1", {}, Exception("connection already closed")),
        DBAPIError("SELECT 1", {}, Exception("reset"), connection_invalidated=True),
        PoolTimeout("QueuePool limit reached"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_connection_errors_are_unavailable(exc: Exception) -> None:
    assert database_unavailable(exc)


@pytest.mark.parametrize(
    "exc",
    [
        IntegrityError("INSERT", {}, Exception("duplicate key")),
        ProgrammingError("SELECT", {}, Exception("syntax error")),
        DBAPIError("SELECT 1", {}, Exception("other")),
        ValueError("not the database"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_statement_errors_are_not(exc: Exception) -> None:
    assert not database_unavailable(exc)


# -- bounded retry and backoff -----------------------------------------------------------------


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.pauses: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


def failing(times: int, exc: Callable[[], Exception] = gone) -> Callable[[], str]:
    calls = [0]

    def fn() -> str:
        calls[0] += 1
        if calls[0] <= times:
            raise exc()
        return "ok"

    return fn


def test_backoff_doubles_up_to_its_bound_and_starts_again_after_a_success() -> None:
    backoff = Backoff(first_s=0.5, max_s=3.0)
    assert [backoff.next() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    backoff.reset()
    assert backoff.next() == 0.5


def test_retry_waits_out_an_outage() -> None:
    t = FakeTime()
    assert retry_unavailable(failing(4), "x", sleep=t.sleep, clock=t.clock) == "ok"
    assert t.pauses == [0.25, 0.5, 1.0, 2.0]


def test_retry_is_bounded() -> None:
    t = FakeTime()
    with pytest.raises(OperationalError):
        retry_unavailable(failing(1000), "x", for_s=30, sleep=t.sleep, clock=t.clock)
    assert 28 <= t.now <= 30 and max(t.pauses) == 2.0


def test_other_errors_are_not_retried() -> None:
    t = FakeTime()
    with pytest.raises(ValueError):
        retry_unavailable(failing(1, lambda: ValueError("bug")), "x", sleep=t.sleep)
    assert t.pauses == []


# -- the API's answer --------------------------------------------------------------------------


def app_raising(exc: Exception) -> TestClient:
    app = FastAPI()
    api_errors.install(app)

    @app.get("/v1/batches")
    async def listing() -> None:
        raise exc

    return TestClient(app, raise_server_exceptions=False)


def test_an_unreachable_database_is_a_503_with_retry_after() -> None:
    response = app_raising(gone()).get("/v1/batches")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    error = response.json()["error"]
    assert error["code"] == "database_unavailable" and error["type"] == "service_unavailable"
    assert "database is unavailable" in error["message"] and "SELECT" not in error["message"]


def test_any_other_database_error_is_a_500_naming_nothing() -> None:
    response = app_raising(IntegrityError("INSERT x", {}, Exception("dup"))).get("/v1/batches")
    assert response.status_code == 500
    assert "INSERT" not in response.text and response.json()["error"]["type"] == "server_error"


# -- the batch engine when a commit's answer is lost ----------------------------------------


def execute(model: str, bodies: list[dict[str, Any]], ids: list[str], owner: Any) -> list[Outcome]:
    return [Outcome(200, {"data": [b["input"]]}, Usage(prompt_tokens=1)) for b in bodies]


def batch_work(settings: Settings, store: FileStore, catalog: Catalog) -> BatchWork:
    return BatchWork(
        settings=settings,
        store=store,
        catalog=catalog,
        capability="embeddings",
        models=[FAKE, MINILM],
        execute=execute,
        notify=lambda capability, batch_id: None,
    )


def validated(settings: Settings, store: FileStore, catalog: Catalog, lines: int) -> str:
    batch_id = new_batch(settings, store, jsonl(lines))
    assert batch_work(settings, store, catalog).drain(limit=1) == 1  # the validation
    assert batch(batch_id).status == "in_progress"
    return batch_id


def lost_answer(real: Callable[..., Any], times: int = 1) -> Callable[..., Any]:
    """``real``, whose first ``times`` calls land and then raise as if the connection
    died before the answer came."""
    calls = [0]

    def wrapped(*args: Any, **kw: Any) -> Any:
        calls[0] += 1
        result = real(*args, **kw)
        if calls[0] <= times:
            raise gone("COMMIT")
        return result

    return wrapped


def claimed(settings: Settings) -> ChunkClaim:
    claim = claim_chunk(settings=settings, capability="embeddings", models=[FAKE])
    assert claim is not None
    return claim


def test_a_chunk_commit_that_landed_unanswered_counts_once(
    db: None, store: FileStore, catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(chunk_lines=2)
    batch_id = validated(settings, store, catalog, 4)
    monkeypatch.setattr(chunks_module, "commit_chunk", lost_answer(chunks_module.commit_chunk))
    claim = claimed(settings)
    assert run_chunk(claim, settings=settings, store=store, execute=execute)
    assert store.exists(claim.part_key + ".out")  # its parts are the chunk's now
    first = chunks(batch_id)[0]
    assert (first.state, first.result_key, first.attempts) == ("done", claim.part_key, 1)
    assert batch(batch_id).request_completed == 2  # added once


def test_a_chunk_commit_waits_for_the_database_to_come_back(
    db: None, store: FileStore, catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(chunk_lines=2)
    batch_id = validated(settings, store, catalog, 4)
    real = chunks_module.commit_chunk
    down = [2]

    def commit(*args: Any, **kw: Any) -> bool:
        if down[0]:
            down[0] -= 1
            raise gone("UPDATE chunks")
        return real(*args, **kw)

    monkeypatch.setattr(chunks_module, "commit_chunk", commit)
    assert run_chunk(claimed(settings), settings=settings, store=store, execute=execute)
    assert batch(batch_id).request_completed == 2


def test_a_commit_never_answered_keeps_its_parts(
    db: None, store: FileStore, catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database stayed away past the retry: whether the commit landed is unknown, so
    the parts stay (the finaliser removes what its batch does not count)."""
    settings = make_settings(chunk_lines=2)
    validated(settings, store, catalog, 4)

    def never(*args: Any, **kw: Any) -> bool:
        raise gone("UPDATE chunks")

    def quick(fn: Callable[[], bool], what: str) -> bool:
        return retry_unavailable(fn, what, for_s=0.3)

    monkeypatch.setattr(chunks_module, "commit_chunk", never)
    monkeypatch.setattr(chunks_module, "retry_unavailable", quick)
    claim = claimed(settings)
    assert not run_chunk(claim, settings=settings, store=store, execute=execute)
    assert store.exists(claim.part_key + ".out")


def test_a_finalisation_that_landed_unanswered_keeps_its_files(
    db: None, store: FileStore, catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(chunk_lines=2)
    batch_id = validated(settings, store, catalog, 4)
    real = lifecycle._commit_finalisation
    monkeypatch.setattr(lifecycle, "_commit_finalisation", lost_answer(real))
    batch_work(settings, store, catalog).drain()
    row = batch(batch_id)
    assert (row.status, row.request_completed) == ("completed", 4)
    assert row.output_file_id is not None
    with session_scope() as s:
        key = get_file(s, row.output_file_id).storage_key
    output = b"".join(store.iter_bytes(key)).splitlines()
    assert [json.loads(x)["custom_id"] for x in output] == [f"req-{i}" for i in range(4)]


def test_a_validation_that_landed_unanswered_is_recorded_once(
    db: None, store: FileStore, catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(chunk_lines=2)
    batch_id = new_batch(settings, store, jsonl(4))
    monkeypatch.setattr(lifecycle, "_record_once", lost_answer(lifecycle._record_once))
    assert batch_work(settings, store, catalog).drain(limit=1) == 1
    assert batch(batch_id).status == "in_progress"
    assert [c.index for c in chunks(batch_id)] == [0, 1]


# -- the batch runner never dies ---------------------------------------------------------------


class Unreachable:
    """A ``BatchWork`` whose database is away for the first ``down`` looks."""

    def __init__(self, down: int) -> None:
        self.down = down
        self.looks = 0
        self.ran = threading.Event()

    def next_job(self) -> object | None:
        self.looks += 1
        if self.looks <= self.down:
            raise gone()
        return None if self.ran.is_set() else "job"

    def run(self, job: object) -> None:
        self.ran.set()


def test_a_runner_waits_out_the_database_and_goes_on() -> None:
    work = Unreachable(down=3)
    runner = BatchRunner(work, threads=1, poll_s=0.05)  # type: ignore[arg-type]
    started = time.monotonic()
    runner.start()
    try:
        assert work.ran.wait(10), "the runner gave up"
        assert time.monotonic() - started >= 0.05 + 0.1 + 0.2  # it backed off
    finally:
        runner.stop()
