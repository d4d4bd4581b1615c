"""A throwaway laneway stack for benchmarks: embedded redis-server, SQLite, one CPU worker,
the API. Not part of the tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from laneway.embedded_redis import free_port, start_redis

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


class BenchStack:
    def __init__(self, root: Path, **env: str) -> None:
        self.root = root
        self.redis, url = start_redis(root / "redis")
        self.port = free_port()
        self.env = {
            **os.environ,
            "LANEWAY_REDIS_URL": url,
            "LANEWAY_DATA_DIR": str(root),
            "LANEWAY_DATABASE_URL": f"sqlite:///{root}/laneway.db",
            "LANEWAY_MODELS": MODEL,
            "LANEWAY_LOG_LEVEL": "WARNING",
            **env,
        }
        me = [sys.executable, "-m", "laneway"]
        subprocess.run([*me, "migrate"], env=self.env, check=True, capture_output=True)
        logs = root / "logs"
        logs.mkdir()
        self.worker = subprocess.Popen(
            [*me, "worker", "--capability", "embeddings", "--device", "cpu"],
            env=self.env,
            stdout=(logs / "worker.log").open("w"),
            stderr=subprocess.STDOUT,
        )
        self.api = subprocess.Popen(
            [*me, "api", "--port", str(self.port), "--no-migrate"],
            env=self.env,
            stdout=(logs / "api.log").open("w"),
            stderr=subprocess.STDOUT,
        )
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.base}/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.close()
        raise RuntimeError(f"stack did not become healthy; logs in {logs}")

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
        for proc in (self.api, self.worker, self.redis):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (self.api, self.worker, self.redis):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


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
