"""The one launcher of laneway's processes on this machine.

`laneway up`, the tests' harness (tests/harness.py) and the benchmarks (bench/_stack.py)
all start their embedded redis-server, workers and API through ``Processes``: each child
in its own session (so a signal reaches only what it is meant for), with its own
environment, logging to a file or to the parent's output, and stopped in one order (the
API first so no new work arrives, then the workers, then Redis).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from laneway.embedded_redis import start_redis

LANEWAY = [sys.executable, "-m", "laneway"]


@dataclass
class Proc:
    """One child process in its own session."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path | None
    argv: list[str]
    env_overrides: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def send(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Send ``sig`` and wait; SIGKILL the whole process group if it lingers."""
        self.send(sig)
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.send(signal.SIGKILL)
            return self.popen.wait(timeout=10)
        finally:
            # anything the process left in its group (it should leave nothing)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)

    def log(self) -> str:
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def stop_order(name: str) -> tuple[bool, bool]:
    """The API first (no new work), then the workers, Redis last."""
    return (not name.startswith("api"), name.startswith("redis"))


class Processes:
    """The children of one deployment: spawned with ``env`` plus per-process overrides,
    logging to ``log_dir/NN-name.log`` (or to this process's output without one)."""

    def __init__(
        self, env: Mapping[str, str], *, log_dir: Path | None = None, cwd: Path | None = None
    ) -> None:
        self.env = dict(env)
        self.log_dir = log_dir
        self.cwd = cwd
        self.procs: dict[str, Proc] = {}
        self._seq = 0
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)

    def spawn(
        self, name: str, argv: Sequence[str], overrides: Mapping[str, str] | None = None
    ) -> Proc:
        env = {**self.env, **(overrides or {})}
        self._seq += 1
        log_path = self.log_dir / f"{self._seq:02d}-{name}.log" if self.log_dir else None
        with open(log_path, "wb") if log_path else contextlib.nullcontext() as out:
            popen = subprocess.Popen(
                list(argv),
                env=env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT if out is not None else None,
                start_new_session=True,
            )
        proc = Proc(name, popen, log_path, list(argv), dict(overrides or {}))
        self.procs[name] = proc
        return proc

    def redis(
        self, data_dir: Path, port: int | None = None, password: str | None = None
    ) -> tuple[Proc, str]:
        """An embedded redis-server (it logs to ``data_dir/redis.log`` itself); its URL
        holds its password (a random one unless ``password`` reuses an earlier one)."""
        popen, url = start_redis(data_dir, port=port, password=password)
        argv = [str(a) for a in cast(list[Any], popen.args)]
        proc = Proc("redis", popen, data_dir / "redis.log", argv)
        self.procs["redis"] = proc
        return proc, url

    def migrate(self, overrides: Mapping[str, str] | None = None) -> None:
        subprocess.run(
            [*LANEWAY, "migrate"],
            env={**self.env, **(overrides or {})},
            cwd=self.cwd,
            check=True,
            capture_output=True,
        )

    def worker(
        self,
        capability: str,
        *,
        device: str = "cpu",
        models: Sequence[str] | None = None,
        name: str | None = None,
        overrides: Mapping[str, str] | None = None,
    ) -> Proc:
        argv = [*LANEWAY, "worker", "--capability", capability, "--device", device]
        if models:
            argv += ["--models", ",".join(models)]
        return self.spawn(name or f"worker-{capability}", argv, overrides)

    def api(
        self,
        *,
        host: str,
        port: int,
        name: str = "api",
        workers: int | None = None,
        overrides: Mapping[str, str] | None = None,
    ) -> Proc:
        argv = [*LANEWAY, "api", "--host", host, "--port", str(port), "--no-migrate"]
        if workers:
            argv += ["--workers", str(workers)]
        return self.spawn(name, argv, overrides)

    def running(self) -> Iterator[Proc]:
        yield from (p for p in self.procs.values() if p.alive())

    def stop_all(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        for name in sorted(self.procs, key=stop_order):
            proc = self.procs[name]
            if proc.alive():
                proc.stop(sig, timeout=timeout)


def get_health(base_url: str, timeout: float = 5.0) -> tuple[int, dict[str, Any] | None]:
    """(status, body) of GET /health; (0, None) when nothing answers."""
    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with contextlib.suppress(ValueError):
            return exc.code, json.loads(exc.read())
        return exc.code, None
    except (OSError, ValueError):
        return 0, None


def wait_healthy(
    base_url: str, timeout: float, *, check: Callable[[], None] | None = None
) -> dict[str, Any]:
    """Until /health answers 200 (every served model warm); ``check`` raises to give up
    early (a process died)."""
    deadline = time.monotonic() + timeout
    last: tuple[int, dict[str, Any] | None] = (0, None)
    while time.monotonic() < deadline:
        if check is not None:
            check()
        last = get_health(base_url)
        if last[0] == 200 and last[1] is not None:
            return last[1]
        time.sleep(0.2)
    raise TimeoutError(f"{base_url}/health not 200 within {timeout:.0f}s (last: {last})")
