"""The SQLAlchemy engine and sessions, Alembic migrations run from code, and what a
process does while the database is away (``database_unavailable``, ``retry_unavailable``,
``Backoff``): the API answers 503, the workers' loops wait and try again."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

import migrations
from configs.settings import Settings, get_settings

MIGRATIONS_DIR = Path(migrations.__file__).parent
log = logging.getLogger(__name__)
T = TypeVar("T")

# libpq's options for every Postgres connection: a connect that cannot complete (the
# server gone, a partition) fails after ``connect_timeout`` seconds rather than the OS's
# TCP timeout (minutes), so a request waits a bounded time and answers 503; keepalives and
# ``tcp_user_timeout`` notice a server that vanished under an open connection. The URL's
# own query parameters (``?connect_timeout=10``) take precedence.
POSTGRES_CONNECT_ARGS: dict[str, Any] = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,  # ms
}


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    connect_args: dict[str, Any] = {}
    if url.startswith("postgresql"):
        given = make_url(url).query
        connect_args = {k: v for k, v in POSTGRES_CONNECT_ARGS.items() if k not in given}
    # pre-ping: a pooled connection the server dropped (a restart) is replaced on checkout
    return create_engine(
        url, pool_pre_ping=True, pool_size=10, max_overflow=20, connect_args=connect_args
    )


_engine: Engine | None = None
_sessions: sessionmaker[Session] | None = None


def get_engine(settings: Settings | None = None) -> Engine:
    global _engine, _sessions
    if _engine is None:
        settings = settings or get_settings()
        if settings.database_url is None:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
        _engine = make_engine(settings.effective_database_url)
        _sessions = sessionmaker(_engine, expire_on_commit=False)
    return _engine


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    get_engine()
    assert _sessions is not None
    session = _sessions()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(url: str | None = None, revision: str = "head") -> None:
    """Bring the database to ``revision`` (``laneway migrate`` and start-up both call this)."""
    settings = get_settings()
    if url is None:
        if settings.database_url is None:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
        url = settings.effective_database_url
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)


# -- while the database is away -----------------------------------------------------------

# how long a step that must not be lost (a chunk's fenced commit, a finaliser's) keeps
# trying while the database is away before it gives up and lets its lease lapse
RETRY_FOR_S = 120.0


def database_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the database cannot be reached now (down, restarting, the
    connection cut, the pool out of connections) rather than that a statement is wrong:
    the API answers it 503 ``database_unavailable``, the workers wait and try again."""
    if isinstance(exc, OperationalError | InterfaceError | PoolTimeout):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def describe_unavailable(exc: BaseException) -> str:
    """One line for the log: the driver's own message, without SQLAlchemy's SQL echo."""
    cause = getattr(exc, "orig", None) or exc
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"


class Backoff:
    """Pauses that double after each failure up to ``max_s``, and start again from
    ``first_s`` after a success: a loop that finds the database away waits longer each
    time, but never more than ``max_s``, so it is back within that once the database is."""

    def __init__(self, first_s: float = 0.25, max_s: float = 5.0) -> None:
        self.first_s, self.max_s = first_s, max_s
        self.failures = 0

    def next(self) -> float:
        """The pause after one more failure."""
        pause = min(self.max_s, self.first_s * 2.0 ** min(self.failures, 32))
        self.failures += 1
        return pause

    def reset(self) -> None:
        self.failures = 0


def retry_unavailable(
    fn: Callable[[], T],
    what: str,
    *,
    for_s: float = RETRY_FOR_S,
    backoff: Backoff | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """``fn()``, called again while it fails because the database is unavailable, for up
    to ``for_s`` seconds (then its last error is raised); any other error is raised at
    once. ``fn`` must be safe to repeat: a commit whose answer was lost may have landed,
    so a fenced write checks whether it already did before it writes again."""
    backoff = backoff or Backoff(max_s=2.0)
    deadline = clock() + for_s
    while True:
        try:
            return fn()
        except Exception as exc:
            pause = backoff.next()
            if not database_unavailable(exc) or clock() + pause > deadline:
                raise
            log.warning(
                "%s: the database is unavailable (%s); retrying in %.2gs",
                what,
                describe_unavailable(exc),
                pause,
            )
            sleep(pause)
