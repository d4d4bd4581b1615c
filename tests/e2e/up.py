"""`laneway up` run as a user runs it, in its own session, for the e2e tests: its log,
its health, and every process it ever started (killed at the end, whatever happened)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tests.harness import descendants, tail


class Up:
    def __init__(
        self, data_dir: Path, port: int, log: Path, env: dict[str, str] | None = None
    ) -> None:
        self.data_dir, self.port, self.log = data_dir, port, log
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("LANEWAY_")}
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env.update(env or {})
        self.seen: set[int] = set()  # every descendant ever observed
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Up:
        argv = [sys.executable, "-m", "laneway", "up"]
        argv += ["--data-dir", str(self.data_dir), "--port", str(self.port)]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                argv,
                env=self.env,
                cwd=self.data_dir.parent,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def remember_children(self) -> set[int]:
        assert self.proc is not None
        self.seen |= descendants(self.proc.pid)
        return self.seen

    def wait_healthy(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            self.remember_children()
            assert self.proc is not None and self.proc.poll() is None, (
                f"laneway up exited\n{tail(self.log, 100)}"
            )
            try:
                r = httpx.get(f"{self.base_url}/health", timeout=5)
                if r.status_code == 200:
                    return dict(r.json())
                last = f"{r.status_code} {r.text[:300]}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.3)
        raise AssertionError(f"not healthy in {timeout}s ({last})\n{tail(self.log, 100)}")

    def kill_everything(self) -> None:
        if self.proc is None:
            return
        for pid in {self.proc.pid, *self.remember_children()}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def stop(self) -> None:
        """Ctrl-C, then SIGKILL to anything left."""
        if self.proc is not None:
            self.remember_children()
            self.proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
        self.kill_everything()
