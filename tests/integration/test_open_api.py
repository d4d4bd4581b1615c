"""`laneway api` and `laneway up` as an operator runs them on an address others can reach
(0.0.0.0): with no key anywhere they refuse to start, saying how to set one or opt out;
a static key, a key in the database or LANEWAY_ALLOW_OPEN_API (with a warning) lets them
start. `laneway up` refuses before any worker starts and leaves nothing running."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from laneway.embedded_redis import free_port, start_redis
from tests.harness import descendants, pid_alive

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

FAKE = "laneway/fake-embeddings"


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url = start_redis(tmp_path_factory.mktemp("open-api") / "redis")
    try:
        yield url
    finally:
        proc.kill()
        proc.wait(10)


def env_for(tmp_path: Path, redis_url: str | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LANEWAY_")}
    env |= {
        "LANEWAY_DATA_DIR": str(tmp_path / "data"),
        "LANEWAY_MODELS": FAKE,
        "PYTHONUNBUFFERED": "1",
        **extra,
    }
    if redis_url:
        env["LANEWAY_REDIS_URL"] = redis_url
    return env


def laneway(*args: str, env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "laneway", *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def refused(proc: subprocess.Popen[str], within: float = 60) -> str:
    """The output of a process that must exit non-zero within ``within`` seconds."""
    try:
        out, _ = proc.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"still running after {within}s:\n{out}") from None
    assert proc.returncode != 0, out
    return out


def serves(proc: subprocess.Popen[str], port: int, within: float = 60) -> str:
    """Wait until the API answers over loopback (any status: it got past the checks),
    then stop it; returns its output."""
    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"exited with {proc.returncode}:\n{proc.communicate()[0]}")
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"the API did not answer within {within}s")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
    return out


def test_api_on_all_interfaces_without_a_key_refuses_to_start(
    tmp_path: Path, redis_url: str
) -> None:
    port = free_port()
    started = time.monotonic()
    out = refused(
        laneway(
            "api",
            "--host",
            "0.0.0.0",
            "--port",
            str(port),
            env=env_for(tmp_path, redis_url),
            cwd=tmp_path,
        )
    )
    assert time.monotonic() - started < 30
    assert "refusing to start" in out and "'0.0.0.0'" in out, out
    for how in ("LANEWAY_API_KEY", "laneway keys create", "LANEWAY_ALLOW_OPEN_API"):
        assert how in out, out
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


def test_api_with_a_static_key_starts(tmp_path: Path, redis_url: str) -> None:
    port = free_port()
    env = env_for(tmp_path, redis_url, LANEWAY_API_KEY="sk-test")
    out = serves(
        laneway("api", "--host", "0.0.0.0", "--port", str(port), env=env, cwd=tmp_path), port
    )
    assert "refusing" not in out and "LANEWAY_ALLOW_OPEN_API" not in out, out


def test_api_with_a_key_in_the_database_starts(tmp_path: Path, redis_url: str) -> None:
    env = env_for(tmp_path, redis_url)
    for command in (["migrate"], ["keys", "create", "--name", "ops"]):
        made = subprocess.run(
            [sys.executable, "-m", "laneway", *command],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )
        assert made.returncode == 0, made.stderr
    port = free_port()
    out = serves(
        laneway(
            "api", "--host", "0.0.0.0", "--port", str(port), "--no-migrate", env=env, cwd=tmp_path
        ),
        port,
    )
    assert "refusing" not in out, out


def test_the_opt_out_starts_it_with_a_warning(tmp_path: Path, redis_url: str) -> None:
    port = free_port()
    env = env_for(tmp_path, redis_url, LANEWAY_ALLOW_OPEN_API="true")
    out = serves(
        laneway("api", "--host", "0.0.0.0", "--port", str(port), env=env, cwd=tmp_path), port
    )
    warning = [line for line in out.splitlines() if "LANEWAY_ALLOW_OPEN_API is set" in line]
    assert warning and "WARNING" in warning[0], out


def cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    return ""


def test_laneway_up_refuses_before_starting_any_worker(tmp_path: Path) -> None:
    port = free_port()
    argv = ["up", "--host", "0.0.0.0", "--port", str(port), "--data-dir", str(tmp_path / "data")]
    proc = laneway(*argv, env=env_for(tmp_path, None), cwd=tmp_path)
    children: dict[int, str] = {}
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        for pid in descendants(proc.pid) - children.keys():
            children[pid] = cmdline(pid)
        time.sleep(0.02)
    out = refused(proc)
    assert "refusing to start" in out and "LANEWAY_ALLOW_OPEN_API" in out, out
    assert not [c for c in children.values() if " worker " in c or " api " in c], children
    time.sleep(0.5)
    assert not [pid for pid in children if pid_alive(pid)], "laneway up left processes running"
    # the embedded Redis it stopped again: its URL was logged without the password
    assert "embedded redis-server at redis://:***@127.0.0.1:" in out, out
    assert not re.search(r"redis://:(?!\*\*\*@)[^@\s]+@", out), out
