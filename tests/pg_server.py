"""A Postgres cluster of a test's own, to stop, restart and kill at will.

The fault tests must never touch a shared server (CI runs other stages against one at
the same time), so ``PostgresServer`` makes a cluster in a fresh directory with the
PostgreSQL binaries on this machine (``initdb``, ``pg_ctl``), on a free port, with trust
authentication and ``fsync=off`` (nothing here needs to survive a crash of the machine;
a crash of the server is another matter: ``synchronous_commit`` stays on, so a commit
that was answered survives ``stop("immediate")``). ``url`` is a server URL for
``tests.harness.Stack(..., database_url=url)``, which makes a database per stack on it.

initdb refuses to run as root: as root the binaries run as the ``postgres`` user
(``runuser``), on a directory it owns. When something it needs is missing the server
raises ``PostgresUnavailable``: a fault test must fail then, not skip.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from laneway.embedded_redis import free_port

StopMode = Literal["smart", "fast", "immediate"]
RUN_AS = "postgres"  # initdb and the server refuse root
BIN_DIRS = ("/usr/lib/postgresql/15/bin", "/usr/local/bin", "/usr/lib/postgresql/16/bin")

_OPEN: list[PostgresServer] = []


def _close_all() -> None:
    for server in list(_OPEN):
        with contextlib.suppress(Exception):
            server.close()


atexit.register(_close_all)


class PostgresUnavailable(RuntimeError):
    """The binaries, the user to run them as or ``runuser`` are missing, or the server
    did not start (the message carries its log)."""


def find_bin_dir() -> Path:
    """The directory holding ``initdb`` and ``pg_ctl`` (``LANEWAY_TEST_PG_BIN`` first)."""
    candidates = [os.environ.get("LANEWAY_TEST_PG_BIN", ""), *BIN_DIRS]
    which = shutil.which("pg_ctl")
    if which:
        candidates.append(str(Path(which).resolve().parent))
    for candidate in filter(None, candidates):
        path = Path(candidate)
        if (path / "initdb").is_file() and (path / "pg_ctl").is_file():
            return path
    raise PostgresUnavailable(
        "PostgreSQL's initdb and pg_ctl were not found (looked in "
        f"{', '.join(filter(None, candidates))}); install postgresql (Debian: apt-get "
        "install postgresql) or set LANEWAY_TEST_PG_BIN"
    )


class PostgresServer:
    """One throwaway Postgres cluster: ``start()``, ``stop(mode)``, ``restart()``,
    ``close()`` (stops it and removes its directory). ``host`` is the address it listens
    on (``listen_addresses``); the port stays the same across restarts."""

    def __init__(
        self, *, host: str = "127.0.0.1", port: int | None = None, bin_dir: Path | None = None
    ) -> None:
        self.host = host
        self.port = port or free_port()
        self.bin_dir = bin_dir or find_bin_dir()
        self._as_user = self._run_as()
        self.root = Path(tempfile.mkdtemp(prefix="laneway-pg-"))
        if self._as_user is not None:
            user = pwd.getpwnam(RUN_AS)
            os.chown(self.root, user.pw_uid, user.pw_gid)
        self.data_dir = self.root / "data"
        self.log_path = self.root / "server.log"
        self._initialised = False
        self._closed = False
        _OPEN.append(self)

    @staticmethod
    def _run_as() -> list[str] | None:
        """The prefix that runs a command as ``postgres`` (None: we are not root)."""
        if os.geteuid() != 0:
            return None
        runuser = shutil.which("runuser")
        if runuser is None:
            raise PostgresUnavailable("running as root needs runuser (util-linux) to run Postgres")
        try:
            pwd.getpwnam(RUN_AS)
        except KeyError:
            raise PostgresUnavailable(f"running as root needs a {RUN_AS!r} user") from None
        return [runuser, "-u", RUN_AS, "--"]

    @property
    def url(self) -> str:
        """A server URL for ``Stack(database_url=...)`` (or psycopg)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"postgresql://postgres@{host}:{self.port}/postgres"

    def _run(self, tool: str, args: Sequence[str], timeout: float = 120) -> str:
        argv = [*(self._as_user or []), str(self.bin_dir / tool), *args]
        done = subprocess.run(
            argv, cwd=self.root, capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise PostgresUnavailable(
                f"{tool} {' '.join(args)} exited with {done.returncode}:\n"
                f"{done.stdout}\n{done.stderr}\n{self.logs()}"
            )
        return done.stdout

    def _init(self) -> None:
        data = str(self.data_dir)
        options = ["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"]
        self._run("initdb", ["-D", data, *options])
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(
                f"\nlisten_addresses = '{self.host}'\n"
                f"port = {self.port}\n"
                f"unix_socket_directories = '{self.root}'\n"
                "fsync = off\n"
                "full_page_writes = off\n"
                "max_connections = 200\n"
            )
        with (self.data_dir / "pg_hba.conf").open("a") as hba:
            # a test cluster on any address the test chose (a network namespace's too)
            hba.write("host all all 0.0.0.0/0 trust\nhost all all ::/0 trust\n")
        self._initialised = True

    def start(self, timeout: float = 60) -> PostgresServer:
        """Start the server (making the cluster first) and wait until it takes
        connections."""
        if not self._initialised:
            self._init()
        wait = ["-w", "-t", str(int(timeout))]
        log = ["-l", str(self.log_path)]
        self._run("pg_ctl", ["-D", str(self.data_dir), *log, *wait, "start"], timeout=timeout + 10)
        self._wait_connectable(timeout)
        return self

    def _wait_connectable(self, timeout: float) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.url, connect_timeout=5) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.Error as exc:
                if time.monotonic() > deadline:
                    raise PostgresUnavailable(
                        f"{self.url} not answering: {exc}\n{self.logs()}"
                    ) from exc
                time.sleep(0.1)

    def stop(self, mode: StopMode = "fast", timeout: float = 60) -> None:
        """``pg_ctl stop -m mode``: ``fast`` ends every session and shuts down cleanly,
        ``immediate`` is a crash (recovery runs at the next start)."""
        self._run(
            "pg_ctl",
            ["-D", str(self.data_dir), "-m", mode, "-w", "-t", str(int(timeout)), "stop"],
            timeout=timeout + 10,
        )

    def restart(self, mode: StopMode = "immediate", timeout: float = 60) -> None:
        """Stop (a crash by default) and start again on the same port."""
        self.stop(mode, timeout)
        self.start(timeout)

    def running(self) -> bool:
        pid = self.pid()
        return pid is not None and Path(f"/proc/{pid}").exists()

    def pid(self) -> int | None:
        """The postmaster's pid while it runs."""
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def logs(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    def close(self) -> None:
        """Stop the server (as a crash: nothing in it is kept) and remove its directory."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.running():
                with contextlib.suppress(PostgresUnavailable, subprocess.TimeoutExpired):
                    self.stop("immediate", timeout=30)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            with contextlib.suppress(ValueError):
                _OPEN.remove(self)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()
