"""Faults that really happen, in the middle of a batch: the worker SIGKILLed (and stopped
with SIGTERM), Redis SIGKILLed and restarted empty, Redis flushed, the API restarted. Each
time the batch completes with every custom_id exactly once across the output and error
files, and the counts match the lines.

Short leases make recovery quick: a chunk whose worker died runs again once its
LANEWAY_CHUNK_LEASE_S runs out, put back by a reaper that looks every
LANEWAY_REAPER_INTERVAL_S; lost Redis messages cost nothing, since workers take their
batch work from the database.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select

from tasks.store.models import ChunkRow
from tests.harness import Stack
from tests.integration.batch_support import (
    FAKE,
    assert_exactly_once,
    assert_input_order,
    requests,
    results,
    slow_fake_stack,
    submit,
    wait_finished,
    wait_running,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

SLOW = "test/slow-fake"
LINES, FAIL_EVERY, CHUNK_LINES = 600, 50, 20


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = slow_fake_stack(
        tmp_path_factory.mktemp("faults-stack"),
        env={
            "LANEWAY_CHUNK_LINES": str(CHUNK_LINES),
            "LANEWAY_CHUNK_LEASE_S": "4",
            "LANEWAY_REAPER_INTERVAL_S": "1",
        },
        delays={SLOW: 0.3},
    )
    try:
        yield stack
    finally:
        stack.close()


@pytest.fixture
def client(stack: Stack) -> Any:
    # a fresh client per test: the API may have been restarted by the previous one
    return stack.openai_client(max_retries=2)


def chunk_states(engine: Engine, batch_id: str) -> list[tuple[int, str, int]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(ChunkRow.index, ChunkRow.state, ChunkRow.attempts)
            .where(ChunkRow.batch_id == batch_id)
            .order_by(ChunkRow.index)
        ).all()
    return [(int(i), str(s), int(a)) for i, s, a in rows]


def run_through(client: Any, stack: Stack, fault: Callable[[str], None]) -> Any:
    """A 600-line batch (every 50th line a bad request) with ``fault`` applied mid-run;
    asserts it completes with each custom_id exactly once; returns the batch."""
    lines = requests(LINES, model=SLOW, fail_every=FAIL_EVERY)
    ids = [x["custom_id"] for x in lines]
    batch = submit(client, lines)
    wait_running(client, batch.id, at_least=2 * CHUNK_LINES)
    fault(batch.id)
    client = stack.openai_client(max_retries=2)
    batch = wait_finished(client, batch.id, timeout=120)
    assert batch.status == "completed", batch
    failed = LINES // FAIL_EVERY
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (LINES, LINES - failed, failed)
    output, errors = results(client, batch)
    assert len(output) == counts.completed and len(errors) == counts.failed
    assert_exactly_once(ids, output, errors)
    assert_input_order(ids, output)
    assert_input_order(ids, errors)
    assert all(x["response"]["status_code"] == 200 for x in output)
    assert all(x["response"]["status_code"] == 400 for x in errors)
    assert batch.usage.input_tokens == sum(
        x["response"]["body"]["usage"]["prompt_tokens"] for x in output
    )
    return batch


def assert_live_works(stack: Stack) -> None:
    stack.wait_healthy(timeout=60)
    response = httpx.post(
        f"{stack.base_url}/v1/embeddings", json={"model": FAKE, "input": "after"}, timeout=30
    )
    assert response.status_code == 200, response.text


def test_worker_sigkilled_mid_batch(client: Any, stack: Stack, engine: Engine) -> None:
    lost: list[int] = []

    def kill(batch_id: str) -> None:
        # freeze the worker (nothing commits) until it holds a chunk, then kill it there
        for _ in range(100):
            stack.pause_worker()
            lost[:] = [i for i, state, _ in chunk_states(engine, batch_id) if state == "running"]
            if lost:
                break
            stack.resume_worker()
            time.sleep(0.05)
        assert lost, "never caught the worker running a chunk"
        old = stack.workers[-1]
        new = stack.restart_worker(sig=signal.SIGKILL)  # SIGKILL reaches a stopped process
        assert old.popen.returncode == -signal.SIGKILL
        assert new.pid != old.pid

    batch = run_through(client, stack, kill)
    states = chunk_states(engine, batch.id)
    assert len(states) == LINES // CHUNK_LINES
    assert all(state == "done" for _, state, _ in states)
    redone = {i: attempts for i, _, attempts in states if i in lost}
    assert all(attempts >= 2 for attempts in redone.values()), redone  # run again, counted once
    assert_live_works(stack)


def test_worker_stopped_with_sigterm_mid_batch(client: Any, stack: Stack) -> None:
    """A rolling restart: Celery's warm shutdown, then a new worker."""

    def stop(batch_id: str) -> None:
        old = stack.workers[-1]
        stack.restart_worker(sig=signal.SIGTERM)
        assert old.popen.returncode is not None

    run_through(client, stack, stop)
    assert_live_works(stack)


def test_redis_restarted_mid_batch(client: Any, stack: Stack) -> None:
    worker = stack.workers[-1]

    def restart(batch_id: str) -> None:
        stack.restart_redis(signal.SIGKILL)  # no persistence: every queued message is gone

    run_through(client, stack, restart)
    assert worker.alive(), "the worker died instead of reconnecting to Redis"
    assert stack.workers[-1] is worker
    assert_live_works(stack)


def test_redis_flushed_mid_batch(client: Any, stack: Stack) -> None:
    worker = stack.workers[-1]

    def flush(batch_id: str) -> None:
        stack.flush_redis()

    run_through(client, stack, flush)
    assert worker.alive()
    assert_live_works(stack)


def test_api_restarted_mid_batch(client: Any, stack: Stack) -> None:
    worker = stack.workers[-1]
    api = stack.api

    def restart(batch_id: str) -> None:
        stack.restart_api(wait=True)
        assert stack.api is not api

    run_through(client, stack, restart)
    assert worker.alive()
    assert_live_works(stack)
