"""Postgres restarted in the middle of two batches, and down for 30 s in the middle of
one, on a cluster of the test's own (tests/pg_server.py), with the same API and worker
processes throughout.

Both batches complete with every custom_id exactly once across the output and error
files: a chunk whose commit met the database gone keeps its results and commits once the
database is back (commits are fenced by the chunk's attempt counter, so one that landed
unanswered is recognised, never doubled). While the database is down the batch and file
routes answer 503 ``database_unavailable`` with ``Retry-After`` within a few seconds each,
and live embeddings, authenticated with a database key read before the outage, answer 200.
Once it is back the same processes serve the batch routes again within seconds.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select

from tasks.store.models import ChunkRow
from tests.conftest import write_catalog
from tests.harness import Stack, pid_alive, wait_until
from tests.integration.batch_support import (
    ENDPOINT,
    FAKE,
    FINISHED,
    assert_exactly_once,
    assert_input_order,
    fake_entry,
    jsonl,
    requests,
    results,
    submit,
    wait_finished,
    wait_running,
)
from tests.integration.helpers import assert_openai_error, create_key
from tests.pg_server import PostgresServer

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(300)]

SLOW = "test/slow-fake"
CHUNK_LINES, FAIL_EVERY = 10, 25
OUTAGE_S = 30.0
ANSWER_WITHIN_S = 5.0  # a route's answer while the database is down (connect timeout: 5 s)


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    server = PostgresServer().start()  # raises, never skips, when Postgres is missing
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, pg: PostgresServer) -> Iterator[Stack]:
    """Redis, a database on ``pg``, one worker serving the fake model and a slow copy of
    it (a batch runs for seconds), the API."""
    root = tmp_path_factory.mktemp("db-faults-stack")
    catalog = write_catalog(root / "catalog.yaml", [fake_entry(SLOW, 0.4)])
    env = {
        "LANEWAY_CHUNK_LINES": str(CHUNK_LINES),
        # longer than the outage: the runs that hold chunks commit them once it ends
        "LANEWAY_CHUNK_LEASE_S": "60",
        "LANEWAY_REAPER_INTERVAL_S": "1",
    }
    stack = Stack(root, models=[SLOW, FAKE], model_config=catalog, env=env, database_url=pg.url)
    # the server's log goes with the stack's into the report of a failing test
    (stack.log_dir / "00-postgres.log").symlink_to(pg.log_path)
    try:
        stack.start()
        stack.start_worker(timeout=120)
        stack.start_api()
        stack.wait_healthy(timeout=60)
        yield stack
    finally:
        if not pg.running():  # a failed test may leave it down: the stack drops its database
            pg.start()
        stack.close()


@pytest.fixture(scope="module")
def api_key(stack: Stack) -> str:
    """A database key: the API needs one from now on and reads it from the database."""
    key = create_key(stack, "faults")
    wait_until(
        lambda: httpx.get(f"{stack.base_url}/v1/models", timeout=10).status_code == 401,
        30,
        "the API to read its first database key",
    )
    return key


def client(stack: Stack, api_key: str) -> Any:
    return stack.openai_client(api_key=api_key, max_retries=3)


def processes(stack: Stack) -> tuple[int, int]:
    assert stack.api is not None
    return stack.api.pid, stack.workers[-1].pid


def assert_completed_once(c: Any, engine: Engine, batch: Any, lines: list[Any]) -> None:
    """Completed, each custom_id once, the counts matching the lines, no chunk given up."""
    assert batch.status == "completed", batch
    ids = [x["custom_id"] for x in lines]
    failed = len(lines) // FAIL_EVERY
    counts = batch.request_counts
    expected = (len(lines), len(lines) - failed, failed)
    assert (counts.total, counts.completed, counts.failed) == expected
    output, errors = results(c, batch)
    assert len(output) == counts.completed and len(errors) == counts.failed
    assert_exactly_once(ids, output, errors)
    assert_input_order(ids, output)
    assert all(x["response"]["status_code"] == 200 for x in output)
    assert all(x["response"]["status_code"] == 400 for x in errors)
    with engine.connect() as conn:
        states = conn.execute(select(ChunkRow.state).where(ChunkRow.batch_id == batch.id)).all()
    assert {s for (s,) in states} == {"done"}, states


def both_open_one_running(c: Any, batch_ids: list[str]) -> bool:
    """Both batches in progress, one of them with some requests done and some not (a
    worker runs the older batch's chunks first; which is older is a matter of ids when
    both were made in the same second)."""
    found = [c.batches.retrieve(batch_id) for batch_id in batch_ids]
    for b in found:
        assert b.status not in FINISHED, f"batch {b.id} {b.status} before the fault"
    done = [b.request_counts.completed + b.request_counts.failed for b in found]
    running = [CHUNK_LINES <= d < b.request_counts.total for b, d in zip(found, done, strict=True)]
    return all(b.status == "in_progress" for b in found) and any(running)


def test_postgres_restarted_mid_batch(
    stack: Stack, pg: PostgresServer, api_key: str, engine: Engine
) -> None:
    c = client(stack, api_key)
    batches = []
    for prefix in ("a", "b"):
        lines = requests(150, model=SLOW, fail_every=FAIL_EVERY, prefix=prefix)
        batches.append((submit(c, lines), lines))
    wait_until(lambda: both_open_one_running(c, [b.id for b, _ in batches]), 60, "mid-run")
    before = processes(stack)
    pg.restart("immediate")  # a crash: every connection cut, recovery at start
    for batch, lines in batches:
        assert_completed_once(c, engine, wait_finished(c, batch.id, timeout=150), lines)
    assert processes(stack) == before and all(pid_alive(p) for p in before)


def assert_unavailable(response: httpx.Response, started: float) -> None:
    took = time.monotonic() - started
    assert took < ANSWER_WITHIN_S, f"{response.request.method} {response.request.url}: {took:.1f}s"
    assert_openai_error(response, 503, code="database_unavailable", contains="database")
    assert int(response.headers["retry-after"]) > 0


def check_routes_while_down(http: httpx.Client, file_id: str, batch_id: str) -> None:
    """Every batch and file route 503 (each within seconds); live embeddings 200."""
    upload = {"files": {"file": ("x.jsonl", jsonl(requests(2)))}, "data": {"purpose": "batch"}}
    calls: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/v1/files", upload),
        ("GET", "/v1/files", {}),
        ("GET", f"/v1/files/{file_id}", {}),
        ("GET", f"/v1/files/{file_id}/content", {}),
        ("POST", "/v1/batches", {"json": batch_body(file_id)}),
        ("GET", "/v1/batches", {}),
        ("GET", f"/v1/batches/{batch_id}", {}),
    ]
    for method, path, kw in calls:
        started = time.monotonic()
        assert_unavailable(http.request(method, path, **kw), started)
    live = http.post("/v1/embeddings", json={"model": FAKE, "input": "while the database is down"})
    assert live.status_code == 200, live.text
    assert len(live.json()["data"][0]["embedding"]) == 32


def batch_body(file_id: str) -> dict[str, Any]:
    return {"input_file_id": file_id, "endpoint": ENDPOINT, "completion_window": "24h"}


def test_postgres_down_for_30s_mid_batch(
    stack: Stack, pg: PostgresServer, api_key: str, engine: Engine
) -> None:
    c = client(stack, api_key)
    lines = requests(200, model=SLOW, fail_every=FAIL_EVERY, prefix="down")
    batch = submit(c, lines)
    wait_running(c, batch.id, at_least=CHUNK_LINES)
    file_id = batch.input_file_id
    before = processes(stack)
    headers = {"Authorization": f"Bearer {api_key}"}
    with stack.http(headers=headers, timeout=30) as http:
        pg.stop("fast")
        down_at, rounds = time.monotonic(), 0
        while time.monotonic() - down_at < OUTAGE_S:
            check_routes_while_down(http, file_id, batch.id)
            rounds += 1
            time.sleep(1.0)
        assert rounds >= 5
        pg.start()
        wait_until(  # the pools drop their dead connections and make new ones
            lambda: http.get(f"/v1/batches/{batch.id}").status_code == 200,
            10,
            "the batch routes to answer again",
        )
        assert processes(stack) == before and all(pid_alive(p) for p in before)
        # the same processes take new work: an upload and a batch
        upload = http.post(
            "/v1/files",
            files={"file": ("after.jsonl", jsonl(requests(20, prefix="after")))},
            data={"purpose": "batch"},
        )
        assert upload.status_code == 200, upload.text
        created = http.post("/v1/batches", json=batch_body(upload.json()["id"]))
        assert created.status_code == 200, created.text
    assert_completed_once(c, engine, wait_finished(c, batch.id, timeout=150), lines)
    after = wait_finished(c, created.json()["id"], timeout=60)
    assert after.status == "completed" and after.request_counts.completed == 20, after
