"""Hosts apart: two API hosts and two worker hosts, each in a network namespace of its
own (tests/netns.py), sharing only Redis, Postgres and an S3 endpoint (moto), which
listen in a "hub" namespace. No process shares a file system path with another: the file
store is the bucket, each host has its own data dir.

A file is uploaded through api1 and a batch of it created through api2 (the two APIs
share state only through Postgres, S3 and Redis); live embeddings go through both the
whole time. While the batch runs, worker1 is cut off from Redis for ``PARTITION_S`` (a
blackhole route to Redis's address inside its namespace), then the route is removed.

What must hold: live requests keep succeeding through worker2 during the partition (the
few taken by worker1 as it was cut off fail fast, 503/504 within the request timeout);
the batch completes with every line exactly once across its output and error files (read
through an API); every chunk is committed once; worker1 is the same process afterwards,
publishes its readiness again and serves live requests again.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import redis

from laneway.embedded_redis import redis_config, redis_server_binary
from laneway.stack import LANEWAY, Proc, Processes, get_health
from tasks.queue.names import WORKERS_KEY, worker_metrics_key
from tests.conftest import write_catalog
from tests.harness import TestDatabase, pid_alive, tail, wait_until
from tests.integration.batch_support import (
    ENDPOINT,
    FAKE,
    assert_exactly_once,
    fake_entry,
    jsonl,
    requests,
    results,
    wait_finished,
    wait_running,
)
from tests.netns import Network
from tests.pg_server import PostgresServer
from tests.s3_server import MotoServer

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(300)]

T = TypeVar("T")
SLOW = "test/slow-fake"
LINES, CHUNK_LINES, FAIL_EVERY = 400, 10, 25
# a chunk is one forward and each worker runs one chunk at a time: 40 chunks take ~30 s
FORWARD_DELAY_S = 1.5
PARTITION_S = 15.0
REQUEST_TIMEOUT_S = 8.0  # the APIs' live timeout: what a request lost with worker1 costs
MAX_LOST_LIVE = 6  # live requests worker1 may take as it is cut off (one per connection)
API_PORT, REDIS_PORT, PG_PORT, S3_PORT = 8000, 6379, 5432, 5000
APIS, WORKERS = ("api1", "api2"), ("worker1", "worker2")
# the APIs listen beyond loopback, so they refuse to start without a key
API_KEY = secrets.token_urlsafe(24)
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@dataclass
class Hosts:
    """The deployment: the network, the services' URLs and the laneway processes."""

    net: Network
    hub: ThreadPoolExecutor  # threads inside the hub namespace: the test's way in
    procs: Processes
    root: Path
    redis_url: str = ""
    database_url: str = ""
    apis: dict[str, str] = field(default_factory=dict)  # host -> base URL
    logs_of: list[Path] = field(default_factory=list)  # service logs besides procs'

    def call(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """``fn(*args, **kw)`` in a hub thread (every socket it opens is on the hub)."""
        return self.hub.submit(fn, *args, **kw).result()

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, socket_timeout=10)

    def proc(self, name: str) -> Proc:
        return self.procs.procs[name]

    def logs(self, lines: int = 60) -> str:
        paths = [*sorted(self.root.glob("logs/*.log")), *self.logs_of]
        return "\n".join(f"----- {p.name} -----\n{tail(p, lines)}" for p in paths)


def start_redis(hosts: Hosts, address: str) -> None:
    """The embedded redis-server on the hub's ``address`` (laneway's configuration, bound
    there instead of loopback; password required, so protected mode does not refuse the
    other namespaces)."""
    data_dir = hosts.root / "redis"
    data_dir.mkdir()
    password = secrets.token_urlsafe(24)
    config = redis_config(REDIS_PORT, data_dir, password)
    config = config.replace('bind "127.0.0.1"', f'bind "{address}"')
    argv = [*hosts.net.exec_prefix("hub"), redis_server_binary(), "-"]
    popen = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True
    )
    assert popen.stdin is not None
    popen.stdin.write(config.encode())
    popen.stdin.close()
    hosts.procs.procs["redis"] = Proc("redis", popen, data_dir / "redis.log", argv)
    hosts.logs_of.append(data_dir / "redis.log")
    hosts.redis_url = f"redis://:{password}@{address}:{REDIS_PORT}/0"

    def answers() -> bool:
        with contextlib.suppress(redis.RedisError), contextlib.closing(hosts.redis()) as r:
            return bool(r.ping())
        return False

    wait_until(lambda: hosts.call(answers), 15, "redis-server on the hub")


def laneway_env(hosts: Hosts, moto: MotoServer, bucket: str, catalog: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LANEWAY_")}
    env.update(moto.env(bucket, "hosts-apart"))
    env.update(
        {
            "LANEWAY_API_KEY": API_KEY,
            "LANEWAY_REDIS_URL": hosts.redis_url,
            "LANEWAY_DATABASE_URL": hosts.database_url,
            "LANEWAY_MODELS": f"{SLOW},{FAKE}",
            "LANEWAY_MODEL_CONFIG": str(catalog),
            "LANEWAY_CHUNK_LINES": str(CHUNK_LINES),
            "LANEWAY_BATCH_CHUNKS_IN_FLIGHT": "1",
            # a chunk held by a worker that went silent is taken over within seconds
            "LANEWAY_CHUNK_LEASE_S": "10",
            "LANEWAY_REAPER_INTERVAL_S": "1",
            "LANEWAY_REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S),
            "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
        }
    )
    return env


def start_laneway(hosts: Hosts) -> None:
    """The workers first (warm, readiness in Redis), then the APIs (healthy)."""
    for name in WORKERS:
        argv = [*LANEWAY, "worker", "--capability", "embeddings", "--device", "cpu"]
        data = {"LANEWAY_DATA_DIR": str(hosts.root / name)}
        hosts.procs.spawn(name, [*hosts.net.exec_prefix(name), *argv], data)
    for name in APIS:
        address = hosts.net.hosts[name]
        argv = [*LANEWAY, "api", "--host", address, "--port", str(API_PORT), "--no-migrate"]
        data = {"LANEWAY_DATA_DIR": str(hosts.root / name)}
        hosts.procs.spawn(name, [*hosts.net.exec_prefix(name), *argv], data)
        hosts.apis[name] = f"http://{address}:{API_PORT}"
    for name in WORKERS:
        wait_until(lambda n=name: warm(hosts, n), 120, f"{name} warm")  # type: ignore[misc]
    for name, url in hosts.apis.items():
        wait_until(lambda n=name, u=url: healthy(hosts, n, u), 60, f"{name} healthy")  # type: ignore[misc]


def healthy(hosts: Hosts, name: str, url: str) -> bool:
    proc = hosts.proc(name)
    if not proc.alive():
        raise AssertionError(f"{name} exited with {proc.popen.returncode}\n{hosts.logs()}")
    return hosts.call(get_health, url)[0] == 200


def readiness(hosts: Hosts, name: str) -> dict[str, Any] | None:
    """What worker ``name`` last published in Redis (matched by its pid)."""
    pid = hosts.proc(name).pid

    def read() -> dict[str, Any] | None:
        with contextlib.closing(hosts.redis()) as r:
            for raw in r.hvals(WORKERS_KEY):
                info = json.loads(raw)
                if info.get("pid") == pid:
                    return dict(info)
        return None

    return hosts.call(read)


def warm(hosts: Hosts, name: str) -> bool:
    proc = hosts.proc(name)
    if not proc.alive():
        raise AssertionError(f"{name} exited with {proc.popen.returncode}\n{hosts.logs()}")
    info = readiness(hosts, name) or {}
    models = info.get("models", {})
    return bool(models) and all(m.get("warm") for m in models.values())


def fresh_readiness(hosts: Hosts, name: str) -> bool:
    """Worker ``name`` is warm and its last heartbeat is recent (one reached Redis)."""
    info = readiness(hosts, name) or {}
    return warm(hosts, name) and time.time() - float(info.get("ts", 0)) < 3


def live_forwards(hosts: Hosts, name: str) -> int:
    """Forwards of the live-only model that worker ``name`` reported with its heartbeat."""
    info = readiness(hosts, name)
    assert info is not None, f"{name} published no readiness"

    def read() -> int:
        with contextlib.closing(hosts.redis()) as r:
            raw = r.get(worker_metrics_key(info["id"]))
        return int(json.loads(raw)["models"][FAKE]["forwards"]) if raw else -1

    return hosts.call(read)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    root = tmp_path_factory.mktemp("hosts-apart")
    net = Network()
    hub = net.executor("hub", threads=6)  # its threads enter the hub on first use
    hosts = Hosts(net, hub, Processes({}, log_dir=root / "logs", cwd=root), root)
    pg: PostgresServer | None = None
    moto: MotoServer | None = None
    db: TestDatabase | None = None
    try:
        net.start(service_addresses=3)  # raises (never skips) without root or iproute2
        for name in (*APIS, *WORKERS):
            net.add_host(name)
        redis_at, pg_at, s3_at = (net.service_address(n) for n in range(3))
        start_redis(hosts, redis_at)
        # started from a hub thread, so the cluster and moto are born in the hub namespace
        pg = PostgresServer(host=pg_at, port=PG_PORT)
        hosts.logs_of.append(pg.log_path)
        hosts.call(pg.start)
        moto = MotoServer(root / "moto", host=s3_at, port=S3_PORT)
        hosts.logs_of.append(moto.log_path)
        hosts.call(moto.start)
        bucket = hosts.call(moto.new_bucket)
        db = hosts.call(TestDatabase, root / "db", pg.url)
        hosts.database_url = db.url
        from tasks.store.db import migrate

        hosts.call(migrate, db.url)
        catalog = write_catalog(root / "catalog.yaml", [fake_entry(SLOW, FORWARD_DELAY_S)])
        hosts.procs.env = laneway_env(hosts, moto, bucket, catalog)
        start_laneway(hosts)
        yield hosts
    except BaseException:
        print(hosts.logs())
        raise
    finally:
        hosts.procs.stop_all(signal.SIGTERM, timeout=15)
        if db is not None:
            with contextlib.suppress(Exception):
                hosts.call(db.drop)
        if moto is not None:
            moto.stop()
        if pg is not None:
            pg.close()
        hub.shutdown(wait=False, cancel_futures=True)
        net.close()


@dataclass
class LiveLoad:
    """Live embeddings through one API, one after another, until ``stop``: each result
    as (started at, status, seconds)."""

    url: str
    stop: threading.Event
    done: list[tuple[float, int, float]] = field(default_factory=list)

    def run(self) -> None:
        body = {"model": FAKE, "input": "a live request across the hosts"}
        with httpx.Client(base_url=self.url, timeout=REQUEST_TIMEOUT_S + 20, headers=AUTH) as http:
            while not self.stop.is_set():
                started = time.monotonic()
                try:
                    status = http.post("/v1/embeddings", json=body).status_code
                except httpx.HTTPError:
                    status = 0
                self.done.append((started, status, time.monotonic() - started))
                time.sleep(0.1)

    def between(self, start: float, end: float) -> list[tuple[float, int, float]]:
        return [x for x in self.done if start <= x[0] < end]


def openai_client(url: str) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=30)


def create_batch(hosts: Hosts, lines: list[Any]) -> tuple[Any, Any]:
    """Upload through api1, create through api2; returns both clients and the batch."""
    c1, c2 = (openai_client(hosts.apis[name]) for name in APIS)
    upload = hosts.call(c1.files.create, file=("in.jsonl", jsonl(lines)), purpose="batch")
    batch = hosts.call(
        c2.batches.create, input_file_id=upload.id, endpoint=ENDPOINT, completion_window="24h"
    )
    return (c1, c2), batch


def chunk_rows(hosts: Hosts, batch_id: str) -> list[tuple[int, str, int, int, int]]:
    """(index, state, attempts, completed, failed) of every chunk, and its usage rows."""
    import psycopg

    def read() -> list[tuple[int, str, int, int, int]]:
        with psycopg.connect(hosts.database_url) as conn:
            rows = conn.execute(
                'SELECT "index", state, attempts, completed, failed FROM batch_chunks '
                'WHERE batch_id = %s ORDER BY "index"',
                (batch_id,),
            ).fetchall()
        return [tuple(r) for r in rows]  # type: ignore[misc]

    return hosts.call(read)


def partition(hosts: Hosts, loads: list[LiveLoad]) -> tuple[float, float]:
    """Cut worker1 off from Redis for ``PARTITION_S``, then heal; returns (cut, healed)."""
    redis_at = hosts.net.service_address(0)
    hosts.net.cut("worker1", redis_at)
    cut_at = time.monotonic()
    try:
        time.sleep(PARTITION_S)
        during = [x for load in loads for x in load.between(cut_at, time.monotonic())]
        ok = [x for x in during if x[1] == 200]
        # worker2 serves the live lane meanwhile: most requests in the partition succeed
        assert len(ok) >= 20, f"only {len(ok)} live requests succeeded during the partition"
    finally:
        hosts.net.heal("worker1", redis_at)
    return cut_at, time.monotonic()


def check_live(loads: list[LiveLoad], cut_at: float, healed_at: float) -> None:
    before = [x for load in loads for x in load.between(0, cut_at)]
    during = [x for load in loads for x in load.between(cut_at, healed_at + REQUEST_TIMEOUT_S)]
    after = [x for load in loads for x in load.between(healed_at + REQUEST_TIMEOUT_S, 1e12)]
    assert before and all(x[1] == 200 for x in before), before
    failed = [x for x in during if x[1] != 200]
    print(f"live: {len(before)} before, {len(during)} during ({len(failed)} failed: {failed}), "
          f"{len(after)} after")  # fmt: skip
    assert len(failed) <= MAX_LOST_LIVE, failed
    assert all(x[1] in (503, 504) and x[2] <= REQUEST_TIMEOUT_S + 3 for x in failed), failed
    assert after and all(x[1] == 200 for x in after), [x for x in after if x[1] != 200]


def test_worker_cut_off_from_redis_mid_batch(hosts: Hosts) -> None:
    try:
        run_scenario(hosts)
    except BaseException:
        print(hosts.logs())
        raise


def run_scenario(hosts: Hosts) -> None:
    worker1 = hosts.proc("worker1")
    pid, info_before = worker1.pid, readiness(hosts, "worker1")
    assert info_before is not None
    stop = threading.Event()
    loads = [LiveLoad(hosts.apis[name], stop) for name in APIS]
    load_runs = [hosts.hub.submit(load.run) for load in loads]
    try:
        lines = requests(LINES, model=SLOW, fail_every=FAIL_EVERY, prefix="apart")
        (c1, c2), batch = create_batch(hosts, lines)
        hosts.call(wait_running, c1, batch.id, at_least=CHUNK_LINES, timeout=90)
        cut_at, healed_at = partition(hosts, loads)
        mid = hosts.call(c2.batches.retrieve, batch.id)
        assert mid.status == "in_progress", f"the batch ended before the heal: {mid}"
        done = hosts.call(wait_finished, c1, batch.id, timeout=150)
        # live traffic after the heal: a full request timeout past it, for a while
        time.sleep(max(0.0, healed_at + REQUEST_TIMEOUT_S + 5 - time.monotonic()))
    finally:
        stop.set()
        for run in load_runs:
            run.result(timeout=REQUEST_TIMEOUT_S + 30)
    check_live(loads, cut_at, healed_at)
    check_batch(hosts, (c1, c2), done, [x["custom_id"] for x in lines])
    # the same worker1 process: readiness back in Redis, and it serves live work again
    assert worker1.pid == pid and pid_alive(pid)
    wait_until(lambda: fresh_readiness(hosts, "worker1"), 30, "worker1's heartbeat after the heal")
    check_serves_live(hosts)


def check_batch(hosts: Hosts, clients: tuple[Any, Any], batch: Any, ids: list[str]) -> None:
    assert batch.status == "completed", batch
    counts = batch.request_counts
    failed = len(ids) // FAIL_EVERY
    assert (counts.total, counts.completed, counts.failed) == (len(ids), len(ids) - failed, failed)
    for client in clients:  # each API reads the files from S3
        output, errors = hosts.call(results, client, batch)
        assert_exactly_once(ids, output, errors)
        assert len(output) == counts.completed and len(errors) == counts.failed
    chunks = chunk_rows(hosts, batch.id)
    print(f"chunks (index, state, attempts, completed, failed): {chunks}")
    assert len(chunks) == -(-len(ids) // CHUNK_LINES)
    assert all(state == "done" for _, state, *_ in chunks), chunks
    # each chunk's counts committed once: they add up to the lines, no more
    assert sum(c + f for *_, c, f in chunks) == len(ids), chunks


def check_serves_live(hosts: Hosts) -> None:
    """Live requests through both APIs; worker1's live forwards must grow (worker2 is
    paused meanwhile, so the lane has only worker1 to go to)."""
    worker2 = hosts.proc("worker2")
    before = live_forwards(hosts, "worker1")
    assert before >= 0, "worker1 published no metrics"
    worker2.send(signal.SIGSTOP)
    try:
        body = {"model": FAKE, "input": "after the heal"}

        def post(url: str) -> int:
            with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S + 5, headers=AUTH) as http:
                return http.post("/v1/embeddings", json=body).status_code

        statuses = [hosts.call(post, url) for url in hosts.apis.values() for _ in range(3)]
    finally:
        worker2.send(signal.SIGCONT)
    # one request may sit with the paused worker2 (a blocked pop Redis answered): 504
    assert statuses.count(200) >= len(statuses) - 1, statuses
    wait_until(lambda: live_forwards(hosts, "worker1") > before, 15, "worker1's live forwards")
