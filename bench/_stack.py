"""A throwaway laneway stack for benchmarks: embedded redis-server, SQLite, one CPU worker,
the API. Not part of the tests."""

from __future__ import annotations

import os
from pathlib import Path

import httpx

from laneway.embedded_redis import free_port
from laneway.stack import Processes, wait_healthy

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


class BenchStack:
    """Redis, migrations, one CPU worker and the API, through laneway.stack (the launcher
    `laneway up` and the tests use); each process logs under ``root/logs``."""

    def __init__(self, root: Path, **env: str) -> None:
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
        self.worker = self.procs.worker("embeddings", device="cpu")
        self.api = self.procs.api(host="127.0.0.1", port=self.port)
        self.base = f"http://127.0.0.1:{self.port}"

        def alive() -> None:
            for proc in (self.worker, self.api):
                if not proc.alive():
                    raise RuntimeError(f"{proc.name} exited; logs in {root / 'logs'}")

        try:
            wait_healthy(self.base, 180, check=alive)
        except BaseException:
            self.close()
            raise

    def pids(self) -> list[int]:
        return [p.pid for p in (self.api, self.worker, self.redis)]

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


def _own_jiffies(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                rest = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(rest[11]) + int(rest[12])  # utime, stime
    return total


class CpuMeter:
    """How much of the machine's CPU went to processes other than ours since creation.

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
