"""Backpressure and failure paths on a small stack of its own: the fake backend (no
weights, an adjustable forward delay), real Redis, real worker and API processes.

503 without a (warm) worker, 429 + Retry-After on a full live queue, 504 on timeout, and a
caller that hangs up is never computed. Also: the drain really batches concurrent
requests, the embedding cache counts hits, and Redis or API restarts heal.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import write_catalog
from tests.harness import Stack, wait_until
from tests.integration.batch_support import fake_entry
from tests.integration.helpers import (
    assert_openai_error,
    assert_still_serving,
    metrics,
    sample,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

FAST = "test/fake-fast"
SLOW = "test/fake-slow"
SLOW_FORWARD_S = 1.5
WORKER_TTL_S = 2


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root: Path = tmp_path_factory.mktemp("fake-stack")
    catalog = write_catalog(
        root / "catalog.yaml", [fake_entry(FAST, 0.0), fake_entry(SLOW, SLOW_FORWARD_S)]
    )
    stack = Stack(
        root,
        models=[FAST, SLOW],
        model_config=catalog,
        env={
            "LANEWAY_HEARTBEAT_S": "0.5",
            "LANEWAY_WORKER_TTL_S": str(WORKER_TTL_S),
            "LANEWAY_EMBEDDING_CACHE_SIZE": "64",
        },
    )
    try:
        stack.start()
        yield stack
    finally:
        stack.close()


def running_workers(stack: Stack) -> list[Any]:
    return [w for w in stack.workers if w.alive()]


def ensure(
    stack: Stack,
    *,
    api_env: dict[str, str] | None = None,
    worker_env: dict[str, str] | None = None,
) -> None:
    """Exactly one worker and the API, each with the given overrides (None: keep what
    runs), all healthy. Restarts are what cost time, so the tests are ordered to need few."""
    live = running_workers(stack)
    if len(live) != 1 or (worker_env is not None and live[0].env_overrides != worker_env):
        for w in live:
            w.stop()
        stack.workers.clear()
        stack.start_worker(worker_env or {})
    if stack.api is None or not stack.api.alive():
        stack.start_api(api_env or {})
    elif api_env is not None and stack.api.env_overrides != api_env:
        stack.restart_api(api_env)
    stack.wait_healthy(30)


def post(stack: Stack, model: str, text: str, timeout: float = 30) -> httpx.Response:
    return httpx.post(
        f"{stack.base_url}/v1/embeddings", json={"model": model, "input": text}, timeout=timeout
    )


def in_background(fn: Any, *args: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn(*args))
        except Exception as exc:
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def slow_stats(stack: Stack, model: str = SLOW) -> tuple[float, float]:
    """(forwards, items) the worker last reported for ``model``."""
    s = metrics(stack)
    return (
        sample(s, "laneway_forward_batch_size_count", model=model),
        sample(s, "laneway_forward_batch_size_sum", model=model),
    )


def settled_stats(stack: Stack, model: str = SLOW) -> tuple[float, float]:
    """Stats after the worker's next heartbeats (they arrive every 0.5 s here)."""
    time.sleep(1.5)
    return slow_stats(stack, model)


def settled_metrics(stack: Stack) -> dict[str, Any]:
    time.sleep(1.2)
    return metrics(stack)


# -- no worker, then a default worker -----------------------------------------------------


def test_503_when_no_worker_runs(stack: Stack) -> None:
    for w in running_workers(stack):
        w.stop()
    stack.flush_redis()
    if stack.api is None or not stack.api.alive():
        stack.start_api()
    response = post(stack, FAST, "hello")
    error = assert_openai_error(response, 503, code="worker_unavailable")
    assert "laneway worker" in error["message"]
    health = httpx.get(f"{stack.base_url}/health", timeout=10)
    assert health.status_code == 503
    assert health.json()["models"][FAST]["warm"] is False
    assert health.json()["models"][FAST]["workers"] == []


def test_starting_a_worker_makes_it_healthy(stack: Stack) -> None:
    ensure(stack, api_env={}, worker_env={})
    body = httpx.get(f"{stack.base_url}/health", timeout=10).json()
    assert body["status"] == "ok"
    assert_still_serving(stack, FAST)


# -- the default worker: dropped callers, the drain, the cache, restarts ---------------------


def test_client_that_hangs_up_is_not_computed(stack: Stack) -> None:
    ensure(stack, api_env={}, worker_env={})
    with stack.redis() as r:
        r.delete(*r.keys("laneway:gone:*") or ["-"])
    forwards0, items0 = settled_stats(stack)
    # A occupies the slow model's forward; B queues behind it and hangs up meanwhile
    a_thread, a_out = in_background(post, stack, SLOW, "request a")
    time.sleep(0.3)
    with pytest.raises(httpx.ReadTimeout):
        post(stack, SLOW, "request b hangs up", timeout=0.4)
    a_thread.join(30)
    assert a_out[0].status_code == 200
    with stack.redis() as r:
        gone = [k.decode().rsplit(":", 1)[1] for k in r.keys("laneway:gone:*")]
    assert len(gone) == 1, gone  # the API flagged exactly B
    worker = stack.workers[-1]
    wait_until(
        lambda: f"dropped {gone[0]}: caller gone" in worker.log(),
        10,
        "the worker to log the dropped request",
    )
    forwards1, items1 = settled_stats(stack)
    assert (forwards1 - forwards0, items1 - items0) == (1, 1)  # only A was computed
    s = metrics(stack)
    assert sample(s, "laneway_errors_total", route="/v1/embeddings", code="499") >= 1
    assert_still_serving(stack, FAST)
    assert post(stack, SLOW, "after").status_code == 200


def test_concurrent_requests_share_forwards(stack: Stack) -> None:
    ensure(stack, api_env={}, worker_env={})
    forwards0, items0 = settled_stats(stack)
    first = in_background(post, stack, SLOW, "occupies the model")
    time.sleep(0.3)
    rest = [in_background(post, stack, SLOW, f"concurrent {i}") for i in range(8)]
    for thread, out in [first, *rest]:
        thread.join(30)
        assert out[0].status_code == 200
    forwards1, items1 = settled_stats(stack)
    assert items1 - items0 == 9
    # the eight that queued behind the first were drained into one (or few) forwards
    assert forwards1 - forwards0 <= 3


def test_cache_hits_show_in_metrics(stack: Stack) -> None:
    ensure(stack, api_env={}, worker_env={})
    text = f"cache me {time.time()}"
    first = post(stack, FAST, text).json()["data"][0]["embedding"]
    before = sample(settled_metrics(stack), "laneway_embedding_cache_hits_total", model=FAST)
    again = post(stack, FAST, text).json()["data"][0]["embedding"]
    assert again == first
    s = settled_metrics(stack)
    assert sample(s, "laneway_embedding_cache_hits_total", model=FAST) == before + 1
    assert sample(s, "laneway_embedding_cache_misses_total", model=FAST) >= 1


def test_redis_restart_heals(stack: Stack) -> None:
    ensure(stack, api_env={}, worker_env={})
    stack.restart_redis()
    # everything in Redis is gone; the worker's heartbeat publishes readiness again
    stack.wait_healthy(30)
    wait_until(lambda: post(stack, FAST, "after redis").status_code == 200, 20, "a 200")
    assert_still_serving(stack, FAST)


def test_redis_down_is_503_then_heals(stack: Stack) -> None:
    ensure(stack, api_env={}, worker_env={})
    stack.stop_redis()
    try:
        error = assert_openai_error(post(stack, FAST, "no broker"), 503)
        assert error["code"] == "broker_unavailable"
        health = httpx.get(f"{stack.base_url}/health", timeout=15)
        assert health.status_code == 503
        assert health.json()["broker"].startswith("unreachable")
    finally:
        stack.start_redis()  # the same port again
    stack.wait_healthy(30)
    wait_until(lambda: post(stack, FAST, "broker back").status_code == 200, 20, "a 200")


def test_api_restart_on_the_same_port(stack: Stack) -> None:
    ensure(stack, api_env={}, worker_env={})
    url = stack.base_url
    stack.restart_api()
    stack.wait_healthy(30)
    assert stack.base_url == url
    assert_still_serving(stack, FAST)


# -- other settings, each costing an API or worker restart -----------------------------------


def test_504_when_no_result_in_time(stack: Stack) -> None:
    ensure(stack, api_env={"LANEWAY_REQUEST_TIMEOUT_S": "0.5"})
    started = time.monotonic()
    response = post(stack, SLOW, "takes too long")
    elapsed = time.monotonic() - started
    error = assert_openai_error(response, 504, code="timeout")
    assert "0.5" in error["message"]
    assert elapsed < SLOW_FORWARD_S + 1
    # the abandoned request is flagged so workers skip it
    with stack.redis() as r:
        assert r.keys("laneway:gone:*")
    assert_still_serving(stack, FAST)


def test_api_key_is_required_when_set(stack: Stack) -> None:
    import openai

    ensure(stack, api_env={"LANEWAY_API_KEY": "sekret"})
    error = assert_openai_error(post(stack, FAST, "no key"), 401, code="invalid_api_key")
    assert error["type"] == "invalid_request_error"
    wrong = httpx.post(
        f"{stack.base_url}/v1/embeddings",
        json={"model": FAST, "input": "x"},
        headers={"Authorization": "Bearer wrong"},
        timeout=10,
    )
    assert_openai_error(wrong, 401)
    assert_openai_error(httpx.get(f"{stack.base_url}/v1/models", timeout=10), 401)
    with pytest.raises(openai.AuthenticationError):
        stack.openai_client(api_key="wrong", max_retries=0).models.list()
    client = stack.openai_client(api_key="sekret")
    assert len(client.embeddings.create(model=FAST, input="with key").data) == 1
    # operators' routes stay open
    assert httpx.get(f"{stack.base_url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{stack.base_url}/metrics", timeout=10).status_code == 200


def test_killed_worker_expires_after_its_ttl(stack: Stack) -> None:
    ensure(stack, api_env={})
    stack.kill_worker(signal.SIGKILL)
    started = time.monotonic()
    wait_until(
        lambda: httpx.get(f"{stack.base_url}/health", timeout=10).status_code == 503,
        WORKER_TTL_S + 5,
        "/health to notice the dead worker",
    )
    assert time.monotonic() - started <= WORKER_TTL_S + 5
    assert_openai_error(post(stack, FAST, "x"), 503)


def test_429_with_retry_after_when_the_live_queue_is_full(stack: Stack) -> None:
    # a worker that holds one live request at a time, so the rest really wait in Redis
    ensure(
        stack,
        api_env={"LANEWAY_LIVE_QUEUE_MAX": "2"},
        worker_env={"LANEWAY_LIVE_IN_FLIGHT": "1"},
    )
    waiting = []
    for i in range(6):  # staggered, so each sees the depth its predecessors left
        waiting.append(in_background(post, stack, SLOW, f"queued {i}"))
        time.sleep(0.1)
    wait_until(lambda: stack.queue_depth() >= 2, 10, "the live queue to fill")
    response = post(stack, FAST, "one more")
    error = assert_openai_error(response, 429, code="queue_full")
    assert error["type"] == "rate_limit_error"
    assert int(response.headers["retry-after"]) >= 1
    statuses = []
    for thread, out in waiting:
        thread.join(30)
        statuses.append(out[0].status_code)
    # every request was either answered or refused for the same reason, none lost
    assert set(statuses) <= {200, 429}
    assert statuses.count(200) >= 3
    wait_until(lambda: stack.queue_depth() == 0, 15, "the queue to drain")
    assert_still_serving(stack, FAST)


def test_graceful_worker_stop_withdraws_at_once(stack: Stack) -> None:
    ensure(stack)  # whichever worker runs now (the one-thread worker of the 429 test)
    assert stack.kill_worker(signal.SIGTERM) == 0
    # a warm shutdown removes the worker's readiness itself: no TTL to wait for
    response = post(stack, FAST, "anyone?")
    assert_openai_error(response, 503, code="worker_unavailable")
    assert httpx.get(f"{stack.base_url}/health", timeout=10).status_code == 503


def test_logs_are_collected(stack: Stack) -> None:
    logs = stack.logs()
    assert re.search(r"worker\d*\.log", logs)
    assert "api.log" in logs
    assert "Ready to accept connections" in logs  # redis-server's own log
