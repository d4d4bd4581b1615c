"""A throwaway laneway stack for benchmarks: embedded redis-server, SQLite, one CPU worker,
the API. Not part of the tests."""

from __future__ import annotations

import asyncio
import os
import resource
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import redis

from laneway.embedded_redis import free_port
from laneway.stack import Processes, wait_healthy

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# the packaged catalog's weightless backend (workers/backends/fake.py): the plumbing alone
FAKE_MODEL = "laneway/fake-embeddings"
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchStack:
    """Redis, migrations, one CPU worker of ``capability`` and the API, through
    laneway.stack (the launcher `laneway up` and the tests use); each process logs under
    ``root/logs``."""

    def __init__(
        self,
        root: Path,
        *,
        capability: str = "embeddings",
        more_capabilities: tuple[str, ...] = (),
        **env: str,
    ) -> None:
        self.root = root
        base = {
            **os.environ,
            "LANEWAY_DATA_DIR": str(root),
            "LANEWAY_DATABASE_URL": f"sqlite:///{root}/laneway.db",
            "LANEWAY_MODELS": MODEL,
            "LANEWAY_LOG_LEVEL": "WARNING",
            **env,
        }
        self.procs = Processes(base, log_dir=root / "logs", cwd=root)
        self.redis, url = self.procs.redis(root / "redis")
        self.procs.env["LANEWAY_REDIS_URL"] = url
        self.env = self.procs.env
        self.procs.migrate()
        self.port = free_port()
        self.worker = self.procs.worker(capability, device="cpu")
        # one worker per further capability (a soak runs several)
        self.workers = [self.worker] + [
            self.procs.worker(c, device="cpu") for c in more_capabilities
        ]
        self.api = self.procs.api(host="127.0.0.1", port=self.port)
        self.base = f"http://127.0.0.1:{self.port}"

        def alive() -> None:
            for proc in (*self.workers, self.api):
                if not proc.alive():
                    raise RuntimeError(f"{proc.name} exited; logs in {root / 'logs'}")

        try:
            wait_healthy(self.base, 180, check=alive)
        except BaseException:
            self.close()
            raise

    def pids(self) -> list[int]:
        return [p.pid for p in (self.api, self.worker, self.redis)]

    def roles(self) -> dict[str, int]:
        """The launched pid of each part; their children (several uvicorn processes, say)
        are found under them by ``process_tree``."""
        return {"API": self.api.pid, "worker": self.worker.pid, "redis": self.redis.pid}

    def metric(self, name: str) -> float:
        """Sum of a Prometheus series over all its labels, from the API's /metrics."""
        total = 0.0
        for line in httpx.get(f"{self.base}/metrics").text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def close(self) -> None:
        self.procs.stop_all(timeout=20)


def _busy_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name: [state, ppid, ...], field 3 onwards."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()
    except OSError:
        return None


def _children() -> dict[int, list[int]]:
    """ppid -> pids, over every process on the machine."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (rest := _stat(int(entry.name))) is not None:
            children.setdefault(int(rest[1]), []).append(int(entry.name))
    return children


def process_tree(roots: Iterable[int], children: dict[int, list[int]] | None = None) -> set[int]:
    """``roots`` and all their living descendants."""
    children = _children() if children is None else children
    seen: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(children.get(pid, ()))
    return seen


def _own_jiffies(pids: Iterable[int], children: dict[int, list[int]] | None = None) -> int:
    """CPU jiffies of ``pids``' trees: utime + stime of each living process, plus cutime +
    cstime (its children that have exited and been reaped, so none is counted twice)."""
    total = 0
    for pid in process_tree(pids, children):
        if (rest := _stat(pid)) is not None:
            total += sum(int(x) for x in rest[11:15])
    return total


def tree_cpu_s(pids: Iterable[int]) -> float:
    """CPU seconds used so far by ``pids`` and their descendants."""
    return _own_jiffies(pids) / CLK_TCK


def own_cpu_s() -> float:
    """CPU seconds used so far by this process (all its threads), not its children."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_by_role(roles: Mapping[str, int]) -> dict[str, float]:
    """CPU seconds so far of each role's process tree, and this process's as "bench"."""
    children = _children()
    cpu = {name: _own_jiffies([pid], children) / CLK_TCK for name, pid in roles.items()}
    cpu["bench"] = own_cpu_s()
    return cpu


class CpuMeter:
    """How much of the machine's CPU went to processes other than ours (this one, ``pids``
    and all their descendants) since creation.

    Linux only; reports 0 elsewhere."""

    def __init__(self, pids: list[int] | None = None) -> None:
        self.pids = [os.getpid(), *(pids or [])]
        self.ok = Path("/proc/stat").exists()
        if self.ok:
            self.busy0, self.total0 = _busy_jiffies()
            self.own0 = _own_jiffies(self.pids)

    def foreign_share(self) -> float:
        if not self.ok:
            return 0.0
        busy, total = _busy_jiffies()
        own = _own_jiffies(self.pids) - self.own0
        elapsed = max(total - self.total0, 1)
        return max(busy - self.busy0 - own, 0) / elapsed


def load_backend():  # type: ignore[no-untyped-def]
    """The served model, loaded in this process the way the worker loads it."""
    from transformers.utils import logging as hf_logging

    from configs.catalog import load_catalog
    from workers.backends import backend_class

    hf_logging.disable_progress_bar()

    entry = load_catalog().get(MODEL)
    path = entry.resolve_path(auto_download=False)
    backend = backend_class(entry)(entry, device="cpu", model_path=path)
    backend.load()
    backend.warmup()
    return backend


@dataclass
class RedisMemory:
    used_bytes: int  # INFO memory used_memory
    keys: int  # DBSIZE
    laneway_keys: int  # keys matching laneway:*


def redis_memory(url: str) -> RedisMemory:
    """What the stack's Redis holds now."""
    client = redis.Redis.from_url(url)
    try:
        used = int(client.info("memory")["used_memory"])
        keys = int(client.dbsize())
        laneway = sum(1 for _ in client.scan_iter(match="laneway:*", count=1000))
    finally:
        client.close()
    return RedisMemory(used, keys, laneway)


# (method, path, JSON body or None): one HTTP request of a load
Request = tuple[str, str, dict[str, Any] | None]
# the request client ``k`` sends as its ``i``-th
MakeRequest = Callable[[int, int], Request]


@dataclass
class Load:
    ok: int  # answered 200, ramp-up and tail included
    errors: int  # any other status, or no answer
    window_ok: int  # answered 200 within the measured window
    window_s: float

    @property
    def requests(self) -> int:
        return self.ok + self.errors

    @property
    def rate(self) -> float:
        return self.window_ok / self.window_s if self.window_s else 0.0


class _Clients:
    """The shared state of one load: counters and what is left to send."""

    def __init__(self, http: aiohttp.ClientSession, make: MakeRequest, total: int | None):
        self.http, self.make, self.left = http, make, total
        self.ok = self.errors = 0
        self.stop = asyncio.Event()

    def _take(self) -> bool:
        if self.stop.is_set() or (self.left is not None and self.left <= 0):
            return False
        if self.left is not None:
            self.left -= 1
        return True

    async def client(self, k: int) -> None:
        i = 0
        while self._take():
            method, path, body = self.make(k, i)
            i += 1
            try:
                async with self.http.request(method, path, json=body) as r:
                    await r.read()
                    ok = r.status == 200
            except aiohttp.ClientError:
                ok = False
                await asyncio.sleep(0.01)
            if ok:
                self.ok += 1
            else:
                self.errors += 1


async def _load(
    base: str,
    make: MakeRequest,
    concurrency: int,
    seconds: float | None,
    total: int | None,
    ramp_s: float,
) -> Load:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(base, connector=connector) as http:
        clients = _Clients(http, make, total)
        tasks = [asyncio.create_task(clients.client(k)) for k in range(concurrency)]
        t0 = time.perf_counter()
        if seconds is None:
            await asyncio.gather(*tasks)
            return Load(clients.ok, clients.errors, clients.ok, time.perf_counter() - t0)
        await asyncio.sleep(ramp_s)
        ok0, t0 = clients.ok, time.perf_counter()
        await asyncio.sleep(seconds)
        window_ok, window_s = clients.ok - ok0, time.perf_counter() - t0
        clients.stop.set()
        await asyncio.gather(*tasks)
    return Load(clients.ok, clients.errors, window_ok, window_s)


def run_load(
    base: str,
    make: MakeRequest,
    concurrency: int,
    *,
    seconds: float | None = None,
    total: int | None = None,
    ramp_s: float = 2.0,
) -> Load:
    """``concurrency`` clients, each sending its next request once the last is answered, on
    one asyncio loop with aiohttp (keep-alive, one connection a client): for ``seconds``
    after ``ramp_s`` of ramp-up (the rate is over that window), or until ``total``
    requests are answered (the rate is over the whole run). Threads of the `openai` client
    would cost more CPU than the server and measure the client, not laneway."""
    if (seconds is None) == (total is None):
        raise ValueError("give exactly one of seconds and total")
    return asyncio.run(_load(base, make, concurrency, seconds, total, ramp_s))


async def _sequential(base: str, request: Request, requests: int, warmup: int) -> list[float]:
    method, path, body = request
    connector = aiohttp.TCPConnector(limit=1)
    samples: list[float] = []
    async with aiohttp.ClientSession(base, connector=connector) as http:
        for n in range(warmup + requests):
            t0 = time.perf_counter()
            async with http.request(method, path, json=body) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"{method} {path}: HTTP {r.status}")
            if n >= warmup:
                samples.append(time.perf_counter() - t0)
    return samples


def sequential_p50(base: str, request: Request, requests: int, warmup: int = 20) -> float:
    """p50 of ``request`` sent one at a time by a lean client: one aiohttp session on one
    kept-alive connection, after ``warmup`` unmeasured requests."""
    return statistics.median(asyncio.run(_sequential(base, request, requests, warmup)))


@dataclass
class Goal:
    """One line of a bench's summary: what was aimed at, what was measured, met or not."""

    name: str
    goal: str
    measured: str
    met: bool


def print_summary(table: list[Goal]) -> None:
    """The goals as a table, each marked met or MISSED."""
    width = max(len(g.name) for g in table)
    goal_w = max(len("goal"), *(len(g.goal) for g in table))
    measured_w = max(len("measured"), *(len(g.measured) for g in table))
    print()
    print(f"{'':{width}}  {'goal':>{goal_w}}  {'measured':>{measured_w}}")
    for g in table:
        verdict = "met" if g.met else "MISSED"
        print(f"{g.name:{width}}  {g.goal:>{goal_w}}  {g.measured:>{measured_w}}  {verdict}")
