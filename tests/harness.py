"""Real laneway processes for tests: Redis, database, workers and the API, one by one.

``Stack`` starts each part as its own OS process (the way docker compose runs them), so
tests can kill, restart or pause any one of them: ``kill_worker(signal.SIGKILL)`` in the
middle of a batch, ``restart_redis()`` on the same port, ``restart_api()`` with other
settings. Every process logs to a file under the stack's directory; ``logs()`` returns
their tails, and ``tests/conftest.py`` attaches them to the report of a failing test.
``close()`` stops everything (also registered with ``atexit`` as a backstop), so no
process outlives the test session, even when a test fails or times out.

Nothing here fakes a part: the only way to make the API answer is a worker that really
loaded its models and published its readiness through Redis. The processes are started
by ``laneway.stack.Processes``, the same launcher `laneway up` and the benches use.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import redis

from laneway.embedded_redis import free_port
from laneway.stack import Proc, Processes, get_health, stop_order
from tasks.queue.names import LIVE, WORKERS_KEY, Lane, queue_name
from tasks.queue.redis_client import sync_client

# test settings must not leak in from the developer's shell
_SCRUBBED_PREFIX = "LANEWAY_"
_TEST_ONLY_ENV = ("LANEWAY_TEST_DATABASE_URL",)

_ACTIVE: list[Stack] = []


def active_stacks() -> list[Stack]:
    """Stacks not closed yet (conftest prints their logs when a test fails)."""
    return list(_ACTIVE)


def _close_all() -> None:
    for stack in list(_ACTIVE):
        with contextlib.suppress(Exception):
            stack.close()


atexit.register(_close_all)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned) or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


def tail(path: Path, lines: int = 80) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (read from /proc; Linux only)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name may hold spaces or parentheses: split after the last ')'
        fields = stat[stat.rfind(")") + 2 :].split()
        if fields and fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] != "Z"


class StackError(RuntimeError):
    """A part did not come up; the message carries the relevant log tails."""


class TestDatabase:
    """A database URL for one stack: a SQLite file, or a fresh database on a Postgres server.

    With a server URL (``postgresql://user@host:port/anydb``) a uniquely named database is
    created on that server and dropped again by ``drop()``.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, root: Path, server_url: str | None = None) -> None:
        self.server_url = server_url
        self.name: str | None = None
        if server_url:
            self.name = f"laneway_test_{uuid.uuid4().hex[:12]}"
            with self._admin() as conn:
                conn.execute(f'CREATE DATABASE "{self.name}"')
            parts = urlsplit(server_url)
            self.url = urlunsplit(parts._replace(path=f"/{self.name}"))
        else:
            root.mkdir(parents=True, exist_ok=True)
            self.url = f"sqlite:///{(root / 'laneway.db').resolve()}"

    @property
    def is_postgres(self) -> bool:
        return self.name is not None

    def _admin(self) -> Any:
        import psycopg

        assert self.server_url is not None
        url = self.server_url.replace("postgresql+psycopg://", "postgresql://")
        return psycopg.connect(url, autocommit=True)

    def drop(self) -> None:
        if self.name is None:
            return
        with self._admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        self.name = None


class Stack:
    """Redis, a database, workers and the API of one laneway deployment, for tests.

    ``env`` holds ``LANEWAY_*`` settings every process gets; ``start_worker`` and
    ``start_api`` take per-process overrides on top. The stack's own directory holds the
    data dir, the file store, the Redis directory and the logs.
    """

    def __init__(
        self,
        root: Path,
        *,
        models: list[str] | None = None,
        model_config: Path | None = None,
        env: Mapping[str, str] | None = None,
        database_url: str | None = None,
        capability: str = "embeddings",
        redis_url: str | None = None,
    ) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.log_dir = self.root / "logs"
        self.log_dir.mkdir(exist_ok=True)
        self.capability = capability
        self.models = list(models or ["sentence-transformers/all-MiniLM-L6-v2"])
        self.model_config = model_config
        self.extra_env = dict(env or {})
        self.server_url = database_url or os.environ.get("LANEWAY_TEST_DATABASE_URL") or None
        self.db: TestDatabase | None = None
        self.redis_proc: Proc | None = None
        self.redis_port: int | None = None
        # an external Redis (e.g. a sentinel:// URL): the stack starts none of its own
        self.external_redis = redis_url is not None
        self.redis_url: str | None = redis_url
        self.workers: list[Proc] = []
        self.other_apis: list[Proc] = []  # start_another_api
        self.api: Proc | None = None
        self.api_port: int | None = None
        self.launcher = Processes({}, log_dir=self.log_dir, cwd=self.root)
        self._closed = False
        _ACTIVE.append(self)

    # -- the shared parts ----------------------------------------------------------------

    def start(self, *, migrate: bool = True) -> Stack:
        """Redis and the database (migrated); workers and the API start separately."""
        if not self.external_redis:
            self.start_redis()
        self.db = TestDatabase(self.root / "db", self.server_url)
        if migrate:
            self.migrate()
        return self

    @property
    def database_url(self) -> str:
        assert self.db is not None, "call start() first"
        return self.db.url

    def migrate(self) -> None:
        from tasks.store.db import migrate

        migrate(self.database_url)

    def start_redis(self, port: int | None = None) -> str:
        """The embedded redis-server; a restart keeps its port and password, so every
        client reconnects with the URL it has."""
        password = urlsplit(self.redis_url).password if self.redis_url else None
        self.redis_proc, url = self.launcher.redis(
            self.root / "redis", port or self.redis_port, password=password
        )
        self.redis_url = url
        self.redis_port = int(urlsplit(url).port or 0)
        return url

    def stop_redis(self, sig: int = signal.SIGTERM) -> None:
        if self.redis_proc is not None:
            self.redis_proc.stop(sig, timeout=10)

    def restart_redis(self, sig: int = signal.SIGKILL) -> str:
        """Stop Redis (SIGKILL by default: no persistence, everything in it is lost) and
        start a new one on the same port; clients reconnect to the same URL."""
        self.stop_redis(sig)
        deadline = time.monotonic() + 10
        while True:
            try:
                return self.start_redis(self.redis_port)
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def redis(self) -> redis.Redis:
        assert self.redis_url, "call start() first"
        return sync_client(self.redis_url, socket_timeout=10)

    def flush_redis(self) -> None:
        with contextlib.closing(self.redis()) as r:
            r.flushall()

    def queue_depth(self, lane: Lane = LIVE) -> int:
        """Messages waiting in Redis on the stack capability's ``lane`` queue."""
        with contextlib.closing(self.redis()) as r:
            return int(r.llen(queue_name(self.capability, lane)))

    # -- environment and processes ---------------------------------------------------------

    def env(self, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(_SCRUBBED_PREFIX) or k in _TEST_ONLY_ENV
        }
        env.update(
            {
                "LANEWAY_REDIS_URL": self.redis_url or "",
                "LANEWAY_DATABASE_URL": self.database_url,
                "LANEWAY_DATA_DIR": str(self.root / "data"),
                "LANEWAY_FILE_STORE": str(self.root / "files"),
                "LANEWAY_MODELS": ",".join(self.models),
                "PYTHONUNBUFFERED": "1",
                "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_OFFLINE": "1",
            }
        )
        if self.model_config is not None:
            env["LANEWAY_MODEL_CONFIG"] = str(self.model_config)
        env.update(self.extra_env)
        env.update(overrides or {})
        return env

    def _launcher(self) -> Processes:
        """The launcher, with the environment as it is now (Redis may have moved)."""
        self.launcher.env = self.env()
        return self.launcher

    # -- workers ---------------------------------------------------------------------------

    def start_worker(
        self,
        env: Mapping[str, str] | None = None,
        *,
        device: str = "cpu",
        models: list[str] | None = None,
        wait: bool = True,
        timeout: float = 120.0,
    ) -> Proc:
        """``laneway worker`` for the stack's capability; waits until its models are warm."""
        proc = self._launcher().worker(
            self.capability,
            device=device,
            models=models,
            name=f"worker{len(self.workers)}",
            overrides=env,
        )
        self.workers.append(proc)
        if wait:
            self.wait_worker_warm(proc, timeout=timeout)
        return proc

    def worker_info(self, proc: Proc) -> dict[str, Any] | None:
        """The readiness the worker published in Redis (None if it has not yet)."""
        with contextlib.closing(self.redis()) as r:
            for raw in r.hvals(WORKERS_KEY):
                info = json.loads(raw)
                if info.get("pid") == proc.pid:
                    return dict(info)
        return None

    def wait_worker_warm(self, proc: Proc, timeout: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive():
                raise StackError(f"{proc.name} exited with {proc.popen.returncode}\n{self.logs()}")
            with contextlib.suppress(redis.RedisError):
                info = self.worker_info(proc)
                models = (info or {}).get("models", {})
                if models and all(m.get("warm") for m in models.values()):
                    assert info is not None
                    return info
            time.sleep(0.2)
        raise StackError(f"{proc.name} not warm within {timeout:.0f}s\n{self.logs()}")

    def _worker(self, index: int) -> Proc:
        if not self.workers:
            raise StackError("no worker was started")
        return self.workers[index]

    def kill_worker(self, sig: int = signal.SIGKILL, index: int = -1, timeout: float = 30) -> int:
        """Signal one worker (SIGKILL: no warm shutdown, readiness stays until its TTL;
        SIGTERM: Celery's warm shutdown) and wait for it to exit; returns the exit code."""
        proc = self._worker(index)
        return proc.stop(sig, timeout=timeout)

    def pause_worker(self, index: int = -1) -> None:
        """SIGSTOP: the worker holds what it took and stops heartbeating."""
        self._worker(index).send(signal.SIGSTOP)

    def resume_worker(self, index: int = -1) -> None:
        self._worker(index).send(signal.SIGCONT)

    def restart_worker(
        self,
        index: int = -1,
        *,
        sig: int = signal.SIGTERM,
        env: Mapping[str, str] | None = None,
        wait: bool = True,
        timeout: float = 120.0,
    ) -> Proc:
        """Stop one worker and start a new one in its place (same overrides unless given)."""
        old = self._worker(index)
        old.stop(sig)
        overrides = old.env_overrides if env is None else env
        new = self._launcher().spawn(old.name, old.argv, overrides)
        self.workers[index] = new
        if wait:
            self.wait_worker_warm(new, timeout=timeout)
        return new

    # -- the API ---------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        assert self.api_port is not None, "start_api() first"
        return f"http://127.0.0.1:{self.api_port}"

    def start_api(
        self,
        env: Mapping[str, str] | None = None,
        *,
        port: int | None = None,
        wait: bool = True,
        healthy: bool = False,
        timeout: float = 60.0,
    ) -> Proc:
        """``laneway api --no-migrate`` on a free port (or ``port``); with ``wait`` returns
        once it answers HTTP, with ``healthy`` once /health says 200."""
        if self.api is not None and self.api.alive():
            raise StackError("the API is already running")
        self.api_port = port or self.api_port or free_port()
        self.api = self._launcher().api(host="127.0.0.1", port=self.api_port, overrides=env)
        if healthy:
            self.wait_healthy(timeout)
        elif wait:
            self.wait_api(timeout)
        return self.api

    def start_another_api(self, name: str, env: Mapping[str, str] | None = None) -> str:
        """One more API process (``laneway api``) on the same Redis and database, on a
        free port; returns its base URL once it answers /health. ``close`` stops it."""
        port = free_port()
        self.other_apis.append(
            self._launcher().api(host="127.0.0.1", port=port, name=name, overrides=env)
        )
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: get_health(url)[0] == 200, 60, f"API {name} to be healthy")
        return url

    def stop_api(self, sig: int = signal.SIGTERM) -> None:
        if self.api is not None:
            self.api.stop(sig)

    def restart_api(
        self,
        env: Mapping[str, str] | None = None,
        *,
        sig: int = signal.SIGTERM,
        wait: bool = True,
        healthy: bool = False,
    ) -> Proc:
        """Stop the API and start it again on the same port (same overrides unless given)."""
        overrides = self.api.env_overrides if (self.api is not None and env is None) else env
        self.stop_api(sig)
        return self.start_api(overrides, port=self.api_port, wait=wait, healthy=healthy)

    def _poll_api(self, timeout: float, accept: Any, what: str) -> httpx.Response:
        deadline = time.monotonic() + timeout
        last: str = "no answer"
        while time.monotonic() < deadline:
            if self.api is None or not self.api.alive():
                code = None if self.api is None else self.api.popen.returncode
                raise StackError(f"the API exited with {code}\n{self.logs()}")
            try:
                response = httpx.get(f"{self.base_url}/health", timeout=5)
                if accept(response):
                    return response
                last = f"{response.status_code} {response.text[:500]}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.2)
        raise StackError(f"{what} within {timeout:.0f}s (last: {last})\n{self.logs()}")

    def wait_api(self, timeout: float = 60.0) -> None:
        """Until the API answers HTTP at all (any status)."""
        self._poll_api(timeout, lambda r: True, "the API did not answer")

    def wait_healthy(self, timeout: float = 120.0) -> dict[str, Any]:
        """Until GET /health answers 200 (every served model warm); returns its body."""
        response = self._poll_api(timeout, lambda r: r.status_code == 200, "/health not 200")
        return dict(response.json())

    def http(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=kw.pop("timeout", 60), **kw)

    def openai_client(self, **kw: Any) -> Any:
        import openai

        kw.setdefault("api_key", self.env().get("LANEWAY_API_KEY", "unused"))
        kw.setdefault("timeout", 60)
        return openai.OpenAI(base_url=f"{self.base_url}/v1", **kw)

    # -- logs and teardown -------------------------------------------------------------------

    def processes(self) -> Iterator[Proc]:
        if self.api is not None:
            yield self.api
        yield from self.other_apis
        yield from self.workers
        if self.redis_proc is not None:
            yield self.redis_proc

    def logs(self, lines: int = 60) -> str:
        """The tail of every log file this stack wrote (old processes included)."""
        parts = []
        paths = sorted(self.log_dir.glob("*.log"))
        if self.redis_proc is not None and self.redis_proc.log_path is not None:
            paths.append(self.redis_proc.log_path)
        for path in paths:
            parts.append(f"----- {path.name} (last {lines} lines) -----\n{tail(path, lines)}")
        return "\n".join(parts)

    def close(self) -> None:
        """Stop the API, the workers and Redis, and drop a Postgres test database."""
        if self._closed:
            return
        self._closed = True
        try:
            for proc in sorted(self.processes(), key=lambda p: stop_order(p.name)):
                with contextlib.suppress(Exception):
                    proc.stop(signal.SIGTERM, timeout=15)
            if self.db is not None:
                self.db.drop()
        finally:
            with contextlib.suppress(ValueError):
                _ACTIVE.remove(self)

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
