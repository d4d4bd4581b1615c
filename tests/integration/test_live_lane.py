"""The live lane end to end: the draining consumer, the reply lists, several API processes.

Real redis-server, real worker and API processes, the fake backend (deterministic vectors,
an adjustable forward delay). What the live lane promises:

- every request gets exactly its own answer, however many share a round or a forward;
- a delivered reply leaves nothing behind in Redis;
- callers of a worker killed mid-request get a clear error within the request timeout;
- several API processes each get their own replies and share the queue bound;
- with task events on, the draining consumer reports live requests as Celery tasks.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import numpy as np
import pytest
from celery import Celery

from configs.catalog import load_catalog
from tests.conftest import write_catalog
from tests.harness import Stack, descendants, wait_until
from tests.integration.batch_support import fake_entry
from tests.integration.helpers import assert_openai_error, metrics, sample
from workers.backends.fake import FakeEmbeddingBackend

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

FAST = "test/live-fast"
SLOW = "test/live-slow"
SLOW_FORWARD_S = 1.0
REPLY_KEYS = "laneway:replies:*"


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("live-catalog")
    return write_catalog(
        root / "catalog.yaml", [fake_entry(FAST, 0.0), fake_entry(SLOW, SLOW_FORWARD_S)]
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, catalog: Path) -> Iterator[Stack]:
    stack = Stack(
        tmp_path_factory.mktemp("live-stack"),
        models=[FAST, SLOW],
        model_config=catalog,
        env={"LANEWAY_HEARTBEAT_S": "0.5"},
    )
    try:
        stack.start()
        stack.start_worker()
        stack.start_api(healthy=True)
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="module")
def expected(catalog: Path) -> FakeEmbeddingBackend:
    """The fake backend in this process: what each text's vector must be."""
    backend = FakeEmbeddingBackend(load_catalog(catalog).get(FAST), device="cpu", model_path="/")
    backend.load()
    return backend


def text(i: int) -> str:
    return f"request {i} asks for its own vector {i * 7919}"


async def _post_all(base: str, bodies: list[dict[str, Any]], concurrency: int) -> list[Any]:
    """(status, JSON body) of each request, ``concurrency`` at a time, in order."""
    limit = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(base, connector=aiohttp.TCPConnector(limit=0)) as http:

        async def one(body: dict[str, Any]) -> tuple[int, Any]:
            async with limit, http.post("/v1/embeddings", json=body) as r:
                return r.status, await r.json(content_type=None)

        return list(await asyncio.gather(*(one(b) for b in bodies)))


def post_all(stack: Stack, bodies: list[dict[str, Any]], concurrency: int = 64) -> list[Any]:
    return asyncio.run(_post_all(stack.base_url, bodies, concurrency))


def vector(item: dict[str, Any]) -> np.ndarray:
    """base64 or floats (written in float32's shortest form: they parse back exactly)."""
    if isinstance(item["embedding"], str):
        return np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
    return np.asarray(item["embedding"], dtype=np.float32)


def assert_own_answers(
    expected: FakeEmbeddingBackend, bodies: list[dict[str, Any]], replies: list[Any]
) -> None:
    for body, (status, reply) in zip(bodies, replies, strict=True):
        assert status == 200, reply
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        want = expected.forward(expected.tokenize(inputs))
        got = np.stack([vector(item) for item in reply["data"]])
        np.testing.assert_array_equal(got, want)


def test_every_request_gets_exactly_its_own_answer(
    stack: Stack, expected: FakeEmbeddingBackend
) -> None:
    bodies: list[dict[str, Any]] = [
        {
            "model": FAST,
            "input": text(i) if i % 3 else [text(i), text(-i)],
            "encoding_format": "base64" if i % 2 else "float",
        }
        for i in range(400)
    ]
    replies = post_all(stack, bodies)
    assert_own_answers(expected, bodies, replies)
    # each reply was taken once: nothing is waiting for a caller that already has it
    with stack.redis() as r:
        assert r.keys(REPLY_KEYS) == []


def test_delivered_replies_leave_nothing_in_redis(stack: Stack) -> None:
    bodies = [{"model": FAST, "input": text(i)} for i in range(2000)]
    with stack.redis() as r:
        keys0 = set(r.keys("*"))
        replies = post_all(stack, bodies)
        assert all(status == 200 for status, _ in replies)
        time.sleep(0.5)
        assert r.keys(REPLY_KEYS) == []
        # what remains is the same handful of keys (heartbeats, metrics, the broker's
        # bindings), not one per request, and they hold next to nothing
        keys = set(r.keys("*"))
        assert len(keys - keys0) <= 2, keys - keys0
        held = sum(int(r.memory_usage(k) or 0) for k in keys)
    # (used_memory itself swings by a few hundred KB with client buffers and the
    # allocator; the keys are what a reply left behind would show in)
    assert held < 64 * 1024, held


def test_a_killed_workers_callers_get_an_error_within_the_timeout(stack: Stack) -> None:
    timeout_s = 3.0
    stack.restart_api({"LANEWAY_REQUEST_TIMEOUT_S": str(timeout_s)}, healthy=True)
    outcomes: list[tuple[int, float]] = []

    def call(i: int) -> None:
        started = time.monotonic()
        r = httpx.post(
            f"{stack.base_url}/v1/embeddings",
            json={"model": SLOW, "input": f"in flight {i}"},
            timeout=timeout_s + 30,
        )
        outcomes.append((r.status_code, time.monotonic() - started))
        if r.status_code != 200:
            assert_openai_error(r, r.status_code)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(SLOW_FORWARD_S / 2)  # the worker holds them: one in its forward, the rest queued
    stack.kill_worker()
    for t in threads:
        t.join(timeout_s + 35)
    assert len(outcomes) == 6
    # nobody hangs: a clear error (504, the request was dropped) within the timeout
    assert {status for status, _ in outcomes} == {504}, outcomes
    assert max(elapsed for _, elapsed in outcomes) < timeout_s + 1.5, outcomes
    stack.workers.clear()
    stack.start_worker()
    stack.restart_api({}, healthy=True)


def test_several_api_processes_each_get_their_replies(
    stack: Stack, expected: FakeEmbeddingBackend
) -> None:
    stack.restart_api({"LANEWAY_API_WORKERS": "3"}, healthy=True)
    assert stack.api is not None
    wait_until(lambda: len(descendants(stack.api.pid)) >= 3, 30, "three API processes")
    bodies: list[dict[str, Any]] = [{"model": FAST, "input": text(i)} for i in range(600)]
    before = sample(
        metrics(stack), "laneway_request_duration_seconds_count", route="/v1/embeddings"
    )
    replies = post_all(stack, bodies)
    assert_own_answers(expected, bodies, replies)
    with stack.redis() as r:
        assert r.keys(REPLY_KEYS) == []
    # /metrics adds up every process's counts, whichever process answers the scrape
    for _ in range(3):
        total = sample(
            metrics(stack), "laneway_request_duration_seconds_count", route="/v1/embeddings"
        )
        assert total - before == len(bodies)


def test_several_api_processes_share_the_queue_bound(stack: Stack) -> None:
    stack.workers[-1].stop()
    stack.workers.clear()
    stack.start_worker({"LANEWAY_LIVE_IN_FLIGHT": "1"})
    stack.restart_api({"LANEWAY_API_WORKERS": "3", "LANEWAY_LIVE_QUEUE_MAX": "3"}, healthy=True)
    depths: list[int] = []
    sampling = threading.Event()

    def watch() -> None:
        while not sampling.is_set():
            depths.append(stack.queue_depth())
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        bodies = [{"model": SLOW, "input": f"bounded {i}"} for i in range(12)]
        replies = post_all(stack, bodies, concurrency=12)
    finally:
        sampling.set()
        watcher.join(5)
    statuses = [status for status, _ in replies]
    assert set(statuses) <= {200, 429}, replies
    assert statuses.count(429) >= 1
    assert statuses.count(200) >= 3
    assert max(depths) <= 3, max(depths)
    for status, reply in replies:
        if status == 429:
            assert reply["error"]["code"] == "queue_full"
    stack.workers[-1].stop()
    stack.workers.clear()
    stack.start_worker()
    stack.restart_api({}, healthy=True)


def test_task_events_list_live_requests(stack: Stack) -> None:
    stack.workers[-1].stop()
    stack.workers.clear()
    stack.start_worker({"LANEWAY_TASK_EVENTS": "true"})
    stack.wait_healthy(30)
    events: list[dict[str, Any]] = []
    app = Celery(broker=stack.redis_url)
    ready = threading.Event()

    def capture() -> None:
        with app.connection() as conn:
            receiver = app.events.Receiver(conn, handlers={"*": events.append})
            ready.set()
            # until the stack's Redis goes away at the end of the module
            with contextlib.suppress(Exception):
                receiver.capture(limit=None, timeout=None, wakeup=False)

    threading.Thread(target=capture, daemon=True).start()
    assert ready.wait(10)
    time.sleep(0.5)  # the receiver's subscription is in place
    response = httpx.post(
        f"{stack.base_url}/v1/embeddings", json={"model": FAST, "input": "watched"}, timeout=30
    )
    assert response.status_code == 200

    def task_states() -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for e in list(events):
            if e.get("type", "").startswith("task-"):
                out.setdefault(e["uuid"], set()).add(e["type"])
        return out

    wait_until(
        lambda: any(
            {"task-received", "task-started", "task-succeeded"} <= s for s in task_states().values()
        ),
        10,
        f"task events for the live request (got {task_states()})",
    )
    names = {e.get("name") for e in events if e.get("type") == "task-received"}
    assert names == {"laneway.embeddings.live"}, names
