"""Many open batches against real processes: batch work holds no thread live work needs,
no chunk is ever run twice while its worker holds it, and live latency stays in bounds.

The model is the fake backend with a fixed forward time, so "one batch forward" is a
known number; a chunk takes four forwards. Forty batches wait far longer than a chunk
lease and many reaper passes, on a worker with only eight Celery threads. Before batch
work moved to the worker's own runners, waiting chunk tasks filled those threads (a live
request waited for a whole chunk to end, not one forward) and the reaper re-sent every
chunk that waited past the queue timeout (messages on the batch lane multiplied).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from tasks.store.models import ChunkRow
from tests.harness import Stack
from tests.integration.batch_support import (
    assert_exactly_once,
    db_engine,
    fake_entry,
    fake_stack,
    requests,
    results,
    submit,
    wait_finished,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SLOW = "test/slow-forward"
SLOW_TOKENIZER = "test/slow-tokenizer"
FORWARD_S = 0.15
CHUNK_LINES, MAX_BATCH = 100, 25  # four forwards a chunk
BATCHES, LINES = 40, 100
LEASE_S = 2.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = fake_stack(
        tmp_path_factory.mktemp("load-stack"),
        entries=[
            fake_entry(SLOW, FORWARD_S),
            # a chunk of 100 inputs takes 3 s to tokenise: longer than its lease
            fake_entry(SLOW_TOKENIZER, 0.0, tokenize_delay_s=0.03),
        ],
        env={
            "LANEWAY_CHUNK_LINES": str(CHUNK_LINES),
            "LANEWAY_CHUNK_LEASE_S": str(LEASE_S),
            "LANEWAY_REAPER_INTERVAL_S": "0.3",
            "LANEWAY_BATCH_POLL_S": "0.5",
            "LANEWAY_WORKER_CONCURRENCY": "8",
            "LANEWAY_MAX_BATCH_SIZE": str(MAX_BATCH),
        },
    )
    try:
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="module")
def client(stack: Stack) -> Any:
    return stack.openai_client(max_retries=0)


def live_latencies(http: httpx.Client, n: int, *, pause: float = 0.0) -> list[float]:
    out = []
    for i in range(n):
        started = time.perf_counter()
        response = http.post("/v1/embeddings", json={"model": SLOW, "input": f"live {i}"})
        out.append(time.perf_counter() - started)
        assert response.status_code == 200, response.text
        time.sleep(pause)
    return out


def chunk_deliveries(stack: Stack, batch_ids: list[str]) -> tuple[int, int]:
    """(chunks, claims of them) over the given batches."""
    engine = db_engine(stack)
    try:
        with engine.connect() as conn:
            count, attempts = conn.execute(
                select(func.count(), func.sum(ChunkRow.attempts)).where(
                    ChunkRow.batch_id.in_(batch_ids)
                )
            ).one()
    finally:
        engine.dispose()
    return int(count), int(attempts or 0)


class BatchLaneCounter:
    """Counts the messages pushed onto the batch lane, from Redis's MONITOR feed."""

    def __init__(self, stack: Stack) -> None:
        self.redis = stack.redis()
        self.pushes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        with self.redis.monitor() as feed:
            for event in feed.listen():
                if self._stop.is_set():
                    return
                if event["command"].startswith("LPUSH embeddings.batch "):
                    self.pushes += 1

    def __enter__(self) -> BatchLaneCounter:
        self._thread.start()
        time.sleep(0.2)
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self.redis.ping()  # one more event, so the feed sees the stop
        self._thread.join(5)


def test_forty_open_batches_leave_live_requests_alone(stack: Stack, client: Any) -> None:
    with stack.http(timeout=30) as http, BatchLaneCounter(stack) as lane:
        live_latencies(http, 3)  # warm the path
        idle = statistics.median(live_latencies(http, 15))
        created = [
            submit(client, requests(LINES, model=SLOW, prefix=f"b{b}-")) for b in range(BATCHES)
        ]
        started = time.monotonic()
        loaded = live_latencies(http, 30, pause=0.05)
        still_open = sum(
            client.batches.retrieve(b.id).status not in ("completed", "failed") for b in created
        )
        finished = [wait_finished(client, b.id, timeout=240) for b in created]
        took = time.monotonic() - started
    assert still_open >= 5, "the batches finished before live latency was measured"
    for lines, batch in zip(
        [requests(LINES, model=SLOW, prefix=f"b{b}-") for b in range(BATCHES)],
        finished,
        strict=True,
    ):
        assert batch.status == "completed", batch
        output, errors = results(client, batch)
        assert_exactly_once([x["custom_id"] for x in lines], output, errors)
    chunks, deliveries = chunk_deliveries(stack, [b.id for b in created])
    assert chunks == BATCHES * LINES // CHUNK_LINES
    assert deliveries == chunks, f"{deliveries} claims for {chunks} chunks"
    # the lane carries hints only (one when a batch is created, one when it starts):
    # nothing is sent again because it waited
    assert lane.pushes <= 2 * BATCHES, f"{lane.pushes} messages for {BATCHES} batches"
    assert took > 2 * LEASE_S  # the batches really waited longer than a lease
    p50 = statistics.median(loaded)
    bound = 1.5 * idle + FORWARD_S
    print(f"live p50 idle {idle * 1000:.0f} ms, under {BATCHES} batches {p50 * 1000:.0f} ms")
    assert p50 <= bound, f"live p50 {p50:.3f}s under load; bound {bound:.3f}s (idle {idle:.3f}s)"


def test_a_chunk_slower_than_its_lease_runs_once(stack: Stack, client: Any) -> None:
    """Tokenising a chunk takes longer than its lease, outside any wait on the model: the
    worker renews the lease all the while, so nobody takes the chunk back and none of its
    requests fails as chunk_failed."""
    lines = requests(2 * CHUNK_LINES, model=SLOW_TOKENIZER, prefix="tok-")
    batch = wait_finished(client, submit(client, lines).id, timeout=120)
    assert batch.status == "completed", batch
    assert batch.request_counts.completed == len(lines) and batch.request_counts.failed == 0
    output, errors = results(client, batch)
    assert_exactly_once([x["custom_id"] for x in lines], output, errors)
    assert chunk_deliveries(stack, [batch.id]) == (2, 2)
