"""`laneway flower` against a real worker with task events on: through Flower's HTTP API
it finds the worker, both lanes' queues with their true lengths and finished tasks (live
and batch); its basic auth comes from LANEWAY_FLOWER_BASIC_AUTH and is enforced; headless
Chromium, with no network beyond loopback, renders its dashboard listing the worker."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from laneway.embedded_redis import free_port
from laneway.stack import LANEWAY, Processes
from tests.browser import render
from tests.harness import Stack, wait_until
from tests.integration.batch_support import FAKE, fake_stack, requests, submit, wait_finished

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

USER, PASSWORD = "ops", "s3cret-flower"
LIVE_TASK, BATCH_TASK = "laneway.embeddings.live", "laneway.embeddings.batch"
QUEUES = ("embeddings.live", "embeddings.batch")


@dataclass
class Flower:
    url: str
    worker: str  # the laneway worker's Celery hostname
    pid: int

    def get(self, path: str, auth: Any = (USER, PASSWORD), **params: Any) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", auth=auth, params=params, timeout=30)

    def json(self, path: str, **params: Any) -> Any:
        response = self.get(path, **params)
        assert response.status_code == 200, f"{path}: {response.status_code} {response.text}"
        return response.json()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = fake_stack(
        tmp_path_factory.mktemp("flower-stack"), entries=[], env={"LANEWAY_TASK_EVENTS": "true"}
    )
    try:
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="module")
def flower(stack: Stack) -> Iterator[Flower]:
    """`laneway flower` on a free port, with the stack's settings and basic auth set."""
    port = free_port()
    # only laneway's setting may configure the auth: no FLOWER_* from the developer's shell
    env = {k: v for k, v in stack.env().items() if not k.startswith("FLOWER_")}
    env["LANEWAY_FLOWER_BASIC_AUTH"] = f"{USER}:{PASSWORD}"
    info = stack.worker_info(stack.workers[0])
    assert info is not None, "the stack's worker published no readiness"
    launcher = Processes(env, log_dir=stack.log_dir, cwd=stack.root)
    argv = [*LANEWAY, "flower", "--host", "127.0.0.1", "--port", str(port)]
    proc = launcher.spawn("flower", argv)
    try:
        yield Flower(f"http://127.0.0.1:{port}", info["id"], proc.pid)
    finally:
        proc.stop(signal.SIGTERM, timeout=15)


def _answers(flower: Flower) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return flower.get("/api/workers").status_code == 200
    return False


@pytest.fixture(scope="module")
def seen(stack: Stack, flower: Flower) -> Flower:
    """Flower up and knowing the worker (its queues included), then some live requests
    and a small batch through the API."""
    wait_until(lambda: _answers(flower), 60, "Flower to answer /api/workers")
    wait_until(
        lambda: flower.worker in flower.json("/api/workers", refresh=1),
        60,
        f"Flower to list {flower.worker}",
    )
    with stack.http() as http:
        for i in range(5):
            response = http.post("/v1/embeddings", json={"model": FAKE, "input": f"hello {i}"})
            assert response.status_code == 200, response.text
    client = stack.openai_client(max_retries=0)
    batch = wait_finished(client, submit(client, requests(3)).id, timeout=90)
    assert batch.status == "completed", batch
    return flower


def test_flower_lists_the_worker_with_both_lanes(seen: Flower) -> None:
    workers = seen.json("/api/workers", refresh=1)
    assert seen.worker in workers, sorted(workers)
    queues = {q["name"] for q in workers[seen.worker]["active_queues"]}
    assert set(QUEUES) <= queues, queues
    # the dashboard's own data: the worker as its events (heartbeats) show it, online
    wait_until(lambda: _online(seen), 30, f"the dashboard to show {seen.worker} online")


def _online(flower: Flower) -> bool:
    rows = flower.json("/workers", json=1)["data"]
    return any(r["hostname"] == flower.worker and r["status"] for r in rows)


def test_flower_holds_finished_live_and_batch_tasks(seen: Flower) -> None:
    def finished() -> set[str]:
        tasks = seen.json("/api/tasks", limit=1000).values()
        return {t["name"] for t in tasks if t["state"] == "SUCCESS" and t["worker"] == seen.worker}

    wait_until(lambda: {LIVE_TASK, BATCH_TASK} <= finished(), 30, "finished live and batch tasks")


def test_flower_shows_the_queue_lengths(stack: Stack, seen: Flower) -> None:
    """With the worker paused, live requests wait in Redis: Flower counts them there."""
    assert _lengths(seen) == {"embeddings.live": 0, "embeddings.batch": 0}
    stack.pause_worker()
    pool = ThreadPoolExecutor(3)
    try:
        calls = [pool.submit(_embed, stack) for _ in range(3)]
        # a paused worker's pending BRPOP may still take one, so count what Redis holds
        wait_until(
            lambda: (
                stack.queue_depth() >= 2
                and _lengths(seen)
                == {"embeddings.live": stack.queue_depth(), "embeddings.batch": 0}
            ),
            15,
            "Flower to count the waiting live requests",
        )
    finally:
        stack.resume_worker()
        pool.shutdown(wait=True)
    assert [c.result() for c in calls] == [200, 200, 200]
    wait_until(lambda: _lengths(seen)["embeddings.live"] == 0, 30, "the live lane to drain")


def _lengths(flower: Flower) -> dict[str, int]:
    queues = flower.json("/api/queues/length")["active_queues"]
    return {q["name"]: q["messages"] for q in queues if q["name"] in QUEUES}


def _embed(stack: Stack) -> int:
    response = httpx.post(
        f"{stack.base_url}/v1/embeddings", json={"model": FAKE, "input": "queued"}, timeout=60
    )
    return response.status_code


def test_the_password_is_not_on_the_command_line(seen: Flower) -> None:
    argv = Path(f"/proc/{seen.pid}/cmdline").read_bytes().split(b"\0")
    assert b"flower" in argv, argv  # `laneway flower` became Celery's flower in place
    assert not any(PASSWORD.encode() in arg for arg in argv), argv


@pytest.mark.parametrize(
    "auth",
    [None, (USER, "wrong"), ("someone", PASSWORD), (USER, PASSWORD + "x")],
    ids=["none", "wrong-password", "wrong-user", "longer-password"],
)
@pytest.mark.parametrize("path", ["/", "/api/workers", "/api/tasks", "/api/queues/length"])
def test_flower_refuses_wrong_credentials(seen: Flower, path: str, auth: Any) -> None:
    response = seen.get(path, auth=auth)
    assert response.status_code == 401, (path, response.status_code)
    if not path.startswith("/api/"):  # a browser is asked for the credentials
        assert response.headers["www-authenticate"].startswith("Basic"), response.headers


def test_chromium_renders_the_dashboard_with_the_worker(seen: Flower) -> None:
    wait_until(lambda: _online(seen), 30, f"the dashboard to show {seen.worker} online")
    dom = render(seen.url.replace("http://", f"http://{USER}:{PASSWORD}@") + "/", budget_ms=5000)
    assert 'id="workers-table"' in dom, dom[:3000]
    assert seen.worker in dom, f"the dashboard does not list {seen.worker}:\n{dom[:3000]}"
