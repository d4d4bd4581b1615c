"""Every Redis client laneway makes comes from here: one place knows the URL forms.

``LANEWAY_REDIS_URL`` is one of

- ``redis://``, ``rediss://`` or ``unix://``: one Redis server (redis-py's ``from_url``);
- ``sentinel://[[user]:password@]host[:port][;sentinel://host[:port]...][/db]?master_name=NAME``
  (``&sentinel_password=P`` when the sentinels ask for one): Redis behind Redis
  Sentinel. The password and db may be written on any of the sentinels (once, or the
  same each time); they are the Redis servers', as in kombu.

A sentinel client is bound to whichever server is the master of ``NAME`` now (redis-py's
``Sentinel.master_for``): its connections ask the sentinels where the master is each
time they connect, and a connection to a master that was demoted (``READONLY``, or the
``UNBLOCKED`` error a blocking pop gets) is dropped and the command retried, so after a
failover the next commands go to the new master by themselves. On top of redis-py, a
client in use asks the sentinels about once a second whether the master moved, and
moves all its connections at once (``_FollowingPool``): every laneway process then
writes to the same server within a second or so of a switch. Timeouts and retries are
bounded so that a request that meets a failover fails within seconds instead of waiting
on a server that is gone.

The Celery broker takes the same string: kombu's Sentinel transport reads
``sentinel://h1:26379;sentinel://h2:26379`` and wants ``master_name`` in its transport
options, so ``celery_broker`` rewrites the URL into that shape (password and db on every
sentinel, since kombu switches to the next one when a connection fails) and returns the
options to add.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.asyncio.sentinel import SentinelConnectionPool as AsyncSentinelConnectionPool
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

log = logging.getLogger(__name__)

SENTINEL = "sentinel"
PLAIN_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_PORT = 26379
_QUERY = ("master_name", "sentinel_password")
_SHAPE = (
    "LANEWAY_REDIS_URL must be redis://, rediss://, unix:// or "
    "sentinel://[:password@]host:port[;sentinel://host:port...][/db]?master_name=NAME"
)

# a sentinel answers in microseconds: one that takes longer is skipped for the next
SENTINEL_TIMEOUT_S = 2.0
# a master that does not accept a connection within this is treated as down
CONNECT_TIMEOUT_S = 5.0
# a command that meets a failover is retried on the new master this many times (the
# first retry normally lands there); more would only stretch a real outage
RETRIES = 3
_BACKOFF = {"base": 0.05, "cap": 0.5}
# how often a client asks the sentinels whether the master moved (one round trip)
FOLLOW_S = 1.0


@dataclass(frozen=True)
class SentinelURL:
    """A parsed ``sentinel://`` URL: where the sentinels are and what to ask them for."""

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None

    @classmethod
    def parse(cls, url: str) -> SentinelURL:
        """``ValueError`` naming LANEWAY_REDIS_URL (never the password) when ``url`` is bad."""
        sentinels: list[tuple[str, int]] = []
        found: dict[str, str] = {}
        for number, part in enumerate(url.split(";"), 1):
            host, port, fields = _sentinel_part(part, number)
            sentinels.append((host, port))
            for key, value in fields.items():
                if found.setdefault(key, value) != value:
                    raise ValueError(f"{_SHAPE}: the sentinels give two different {key}s")
        name = found.get("master_name")
        if not name:
            raise ValueError(
                "LANEWAY_REDIS_URL: a sentinel:// URL needs ?master_name=NAME, the name the "
                "sentinels monitor the master under (`sentinel monitor NAME host port quorum`)"
            )
        return cls(
            sentinels=tuple(sentinels),
            master_name=name,
            db=int(found.get("db", "0")),
            username=found.get("username"),
            password=found.get("password"),
            sentinel_password=found.get("sentinel_password"),
        )

    def sentinel_kwargs(self) -> dict[str, Any]:
        """How to talk to the sentinels themselves (short timeouts, their own password)."""
        kwargs: dict[str, Any] = {
            "socket_timeout": SENTINEL_TIMEOUT_S,
            "socket_connect_timeout": SENTINEL_TIMEOUT_S,
        }
        if self.sentinel_password:
            kwargs["password"] = self.sentinel_password
        return kwargs

    def master_kwargs(self) -> dict[str, Any]:
        """How to talk to the master (the Redis servers' credentials and db)."""
        kwargs: dict[str, Any] = {"db": self.db}
        if self.username:
            kwargs["username"] = self.username
        if self.password:
            kwargs["password"] = self.password
        return kwargs

    def broker_url(self) -> str:
        """kombu's form: ``sentinel://[user:pw@]host:port/db`` per sentinel, joined by ``;``."""
        auth = ""
        if self.username or self.password:
            auth = quote(self.username or "", safe="")
            if self.password:
                auth += ":" + quote(self.password, safe="")
            auth += "@"
        return ";".join(
            f"sentinel://{auth}{_netloc_host(host)}:{port}/{self.db}"
            for host, port in self.sentinels
        )

    def transport_options(self) -> dict[str, Any]:
        """What kombu's Sentinel transport needs besides the URL."""
        return {
            "master_name": self.master_name,
            "sentinel_kwargs": self.sentinel_kwargs(),
            "socket_connect_timeout": CONNECT_TIMEOUT_S,
            # kombu waits forever on a dead connection without it (a publish would hang)
            "socket_timeout": 10.0,
        }


def _netloc_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _sentinel_part(part: str, number: int) -> tuple[str, int, dict[str, str]]:
    """One ``sentinel://`` of the list: its host, port and the fields written on it."""
    try:
        parts = urlsplit(part)
        port = parts.port or SENTINEL_PORT
    except ValueError:
        raise ValueError(f"{_SHAPE}: sentinel {number} has no valid port") from None
    if parts.scheme.lower() != SENTINEL:
        raise ValueError(f"{_SHAPE}: part {number} of the ';' list is not a sentinel:// URL")
    if not parts.hostname:
        raise ValueError(f"{_SHAPE}: sentinel {number} names no host")
    if parts.fragment:
        raise ValueError(f"{_SHAPE}: no #fragment")
    fields: dict[str, str] = {}
    if parts.username:
        fields["username"] = unquote(parts.username)
    if parts.password:
        fields["password"] = unquote(parts.password)
    db = parts.path.strip("/")
    if db:
        if not db.isdigit():
            raise ValueError(f"{_SHAPE}: the db of sentinel {number} is not a number")
        fields["db"] = str(int(db))
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in _QUERY:
            raise ValueError(f"{_SHAPE}: unknown option {key!r} (known: {', '.join(_QUERY)})")
        if fields.setdefault(key, value) != value:
            raise ValueError(f"{_SHAPE}: {key} is given twice")
    return parts.hostname, port, fields


def is_sentinel(url: str) -> bool:
    return urlsplit(url).scheme.lower() == SENTINEL


def check_url(url: str) -> None:
    """``ValueError`` unless ``url`` is a Redis URL laneway can use (settings call this)."""
    scheme = urlsplit(url).scheme.lower()
    if scheme == SENTINEL:
        SentinelURL.parse(url)
    elif scheme not in PLAIN_SCHEMES:
        raise ValueError(f"{_SHAPE}, not {scheme or 'no'} scheme")


def _sentinel_defaults(kwargs: dict[str, Any], retry: Any) -> dict[str, Any]:
    """Bounded waits for a sentinel client, unless the caller chose its own."""
    out = dict(kwargs)
    out.setdefault("socket_connect_timeout", CONNECT_TIMEOUT_S)
    out.setdefault("retry", retry)
    return out


# per sentinel group (master name and sentinels), how many moves the clients of this
# process have seen: a pool that sees a number it has not looked at asks the sentinels
# at once, so the API's request pool and its reply listener move together
_MOVES: dict[Hashable, int] = {}


class _Follower:
    """When a pool should ask the sentinels where the master is, and what it then does."""

    def __init__(self, key: Hashable) -> None:
        self.key = key
        self.moves = _MOVES.get(key, 0)
        self.asked = time.monotonic()

    def due(self, master: Any) -> bool:
        if master is None:  # not connected yet: connecting asks anyway
            return False
        now = time.monotonic()
        if now - self.asked < FOLLOW_S and self.moves == _MOVES.get(self.key, 0):
            return False
        self.asked, self.moves = now, _MOVES.get(self.key, 0)
        return True

    def moved(self, name: str, old: Any, new: Any) -> bool:
        """True (and logged, and told to the other pools) when ``new`` is another master."""
        if new is None or new == old:
            return False
        log.warning("Redis master %s moved from %s to %s; reconnecting", name, old, new)
        _MOVES[self.key] = self.moves = self.moves + 1
        return True


class _FollowingPool(SentinelConnectionPool):
    """redis-py's Sentinel pool, which also asks the sentinels, at most every
    ``FOLLOW_S`` (and at once when another pool of this process saw a move), where the
    master is, and closes every connection (those in use too) as soon as it moved.

    redis-py alone leaves its connections on the old master until that one refuses a
    write: after a manual ``SENTINEL FAILOVER`` the old master keeps accepting writes
    for about ten seconds before the sentinels turn it into a replica, and processes
    that moved and processes that did not would meanwhile write to two different
    servers (a live request on one, its worker on the other). Following the sentinels
    moves every laneway process within a second or so of the switch. While one thread
    asks, the others wait for the answer rather than take a connection to the old
    master meanwhile."""

    def __init__(self, service_name: str, sentinel_manager: Sentinel, **kwargs: Any) -> None:
        self._follower = _Follower(kwargs.pop("follow_key"))
        self._follow_lock = threading.Lock()
        super().__init__(service_name, sentinel_manager, **kwargs)

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        with self._follow_lock:
            if self._follower.due(self.master_address):
                try:
                    address = self.sentinel_manager.discover_master(self.service_name)
                except redis.ConnectionError:
                    address = None  # no answer: the command finds out for itself
                if self._follower.moved(self.service_name, self.master_address, address):
                    self.proxy.master_address = address
                    self.disconnect(inuse_connections=True)
        return super().get_connection(*args, **kwargs)


class _AsyncFollowingPool(AsyncSentinelConnectionPool):
    """``_FollowingPool`` for asyncio clients."""

    def __init__(self, service_name: str, sentinel_manager: AsyncSentinel, **kwargs: Any) -> None:
        self._follower = _Follower(kwargs.pop("follow_key"))
        self._follow_lock = asyncio.Lock()
        super().__init__(service_name, sentinel_manager, **kwargs)

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        async with self._follow_lock:
            if self._follower.due(self.master_address):
                try:
                    address = await self.sentinel_manager.discover_master(self.service_name)
                except redis.ConnectionError:
                    address = None
                if self._follower.moved(self.service_name, self.master_address, address):
                    self.master_address = address
                    await self.disconnect(inuse_connections=True)
        return await super().get_connection(*args, **kwargs)


class _SentinelClient(redis.Redis):
    """A master client that also closes its connections to the sentinels."""

    manager: Sentinel | None = None

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self.manager is not None:
                self.manager.close()


class _AsyncSentinelClient(aioredis.Redis):
    """A master client that also closes its connections to the sentinels."""

    manager: AsyncSentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            if self.manager is not None:
                await self.manager.aclose()


def sync_client(url: str, **kwargs: Any) -> redis.Redis:
    """A client for ``url``; ``kwargs`` as for ``redis.Redis`` (timeouts, pool size)."""
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **kwargs)
    target = SentinelURL.parse(url)
    manager = Sentinel(list(target.sentinels), sentinel_kwargs=target.sentinel_kwargs())
    retry = Retry(ExponentialWithJitterBackoff(**_BACKOFF), RETRIES)
    client = manager.master_for(
        target.master_name,
        redis_class=_SentinelClient,
        connection_pool_class=_FollowingPool,
        follow_key=(target.master_name, target.sentinels),
        **{**target.master_kwargs(), **_sentinel_defaults(kwargs, retry)},
    )
    client.manager = manager
    return cast(redis.Redis, client)


def async_client(url: str, **kwargs: Any) -> aioredis.Redis:
    """An asyncio client for ``url``; ``kwargs`` as for ``redis.asyncio.Redis``."""
    if not is_sentinel(url):
        return aioredis.Redis.from_url(url, **kwargs)
    target = SentinelURL.parse(url)
    manager = AsyncSentinel(list(target.sentinels), sentinel_kwargs=target.sentinel_kwargs())
    retry = AsyncRetry(ExponentialWithJitterBackoff(**_BACKOFF), RETRIES)
    client = manager.master_for(
        target.master_name,
        redis_class=_AsyncSentinelClient,
        connection_pool_class=_AsyncFollowingPool,
        follow_key=(target.master_name, target.sentinels),
        **{**target.master_kwargs(), **_sentinel_defaults(kwargs, retry)},
    )
    client.manager = manager
    return cast(aioredis.Redis, client)


def current_master(client: redis.Redis | aioredis.Redis) -> tuple[str, int] | None:
    """The master a sentinel client's pool last found (None: not a sentinel client, or
    not connected yet). A change means a failover: what the old master held after the
    new one took over is gone."""
    address = getattr(client.connection_pool, "master_address", None)
    return (str(address[0]), int(address[1])) if address else None


def celery_broker(url: str) -> tuple[str, dict[str, Any]]:
    """The broker URL for Celery and the transport options it needs on top of laneway's."""
    if not is_sentinel(url):
        return url, {}
    target = SentinelURL.parse(url)
    return target.broker_url(), target.transport_options()
