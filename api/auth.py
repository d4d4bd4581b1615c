"""Who is calling: the bearer key of a request, checked from memory.

Keys come from three places: ``LANEWAY_API_KEY`` (one key, the owner ``None`` that an API
without keys works as), ``LANEWAY_API_KEYS`` (``name:key`` pairs, each name its own owner)
and the database (`laneway keys create`). The database's keys are read into memory by
every API process and re-read every ``LANEWAY_KEYS_REFRESH_S``, in a thread, by the first
request that finds them stale, while the others go on with what was read before: a key
created or revoked takes effect within seconds, and no request waits on the database
(only the very first one, before anything was read).

With no key anywhere, the API is open. Any key in the database, revoked or expired
included, keeps it closed: revoking the last key must not open it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from configs.settings import Settings
from tasks.access.keys import KeyRecord, hash_key
from tasks.errors import AuthenticationFailed, ServiceUnavailable
from tasks.store.db import describe_unavailable

log = logging.getLogger(__name__)

# longer than any key we make or a sane operator sets: not worth hashing
MAX_TOKEN_BYTES = 512
HOW = "Send it as 'Authorization: Bearer <key>'."


KEY_ID_CHARS = 32  # hex digits of the key's SHA-256 in ``Principal.key_id``: 128 bits


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the key's name (for logs), its owner (of files and
    batches), its limits (None: the settings' defaults) and ``key_id``, a prefix of the
    key's SHA-256: unique per key where names are not (a database key may be named like a
    static one), so what is counted per key (rate limits) is keyed by it."""

    name: str
    owner: str | None
    rpm: int | None = None
    tpm: int | None = None
    key_id: str = field(default="", compare=False)
    # quota overrides by tasks.access.quotas field (absent or None: the settings' defaults)
    quota: Mapping[str, int | None] = field(default_factory=dict, compare=False, hash=False)


def static_records(settings: Settings) -> dict[str, KeyRecord]:
    """The settings' keys by hash."""
    records: dict[str, KeyRecord] = {}
    if settings.api_key:
        records[hash_key(settings.api_key)] = KeyRecord(name="default", owner=None)
    for pair in settings.api_keys:
        name, _, key = pair.partition(":")
        records[hash_key(key)] = KeyRecord(name=name, owner=name)
    return records


def bearer_token(authorization: bytes | None) -> bytes:
    """The key in an ``Authorization: Bearer <key>`` header; 401 for anything else."""
    if not authorization:
        raise AuthenticationFailed(f"You didn't provide an API key. {HOW}")
    scheme, _, token = authorization.strip().partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token:
        raise AuthenticationFailed(f"The Authorization header is malformed. {HOW}")
    if len(token) > MAX_TOKEN_BYTES or b" " in token:
        raise AuthenticationFailed("Incorrect API key provided.")
    return token


class KeyRing:
    """Authenticates requests against the static keys and the database's, from memory.

    The database's keys are re-read in the background once half of
    ``LANEWAY_KEYS_REFRESH_S`` has passed, so under traffic nobody waits for them; a
    request that finds them older than the whole period (an idle process's first) waits
    for the read, so a revoked key stops working within the period whatever the traffic.
    When they cannot be read, what was read before serves for up to
    ``LANEWAY_KEYS_MAX_STALE_S``; past that, database keys are refused (503) until a read
    succeeds: a key revoked meanwhile must not stay valid for as long as the database is
    away. While reads fail, requests do not wait for the next one as long as what was read
    before is within that bound (a read that hangs until the connect timeout would
    otherwise delay every live request by it). Static keys need no read at all."""

    def __init__(
        self,
        settings: Settings,
        load: Callable[[], Mapping[str, KeyRecord]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.static = static_records(settings)
        self.refresh_s = settings.keys_refresh_s
        self.max_stale_s = settings.keys_max_stale_s
        self.load = load
        self.clock = clock
        self.stored: Mapping[str, KeyRecord] | None = None
        self.read_at = float("-inf")
        self.retry_at = float("-inf")  # after a failed read, when to try again
        self.failing = False  # the last read failed (the database away)
        self._refreshing: asyncio.Task[None] | None = None

    async def authenticate(self, authorization: bytes | None) -> Principal | None:
        """The caller, or None when no key is configured anywhere; raises
        ``AuthenticationFailed`` (401) for a missing, malformed, unknown, revoked or
        expired key, ``ServiceUnavailable`` (503) when the database's keys are needed and
        cannot be trusted."""
        if self.static:  # closed whatever the database holds
            token = bearer_token(authorization)
            digest = hash_key(token)
            record = self.static.get(digest) or (await self._stored()).get(digest)
        else:
            stored = await self._stored()
            if not stored:
                return None
            token = bearer_token(authorization)
            digest = hash_key(token)
            record = stored.get(digest)
        if record is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        if record.revoked_at is not None:
            raise AuthenticationFailed("This API key has been revoked.", code="key_revoked")
        if record.expires_at is not None and record.expires_at <= time.time():
            raise AuthenticationFailed("This API key has expired.", code="key_expired")
        return Principal(
            record.name,
            record.owner,
            record.rpm,
            record.tpm,
            digest[:KEY_ID_CHARS],
            quota=record.quota,
        )

    async def _stored(self) -> Mapping[str, KeyRecord]:
        age = self.clock() - self.read_at
        if age >= self.refresh_s / 2 and self._refreshing is None and self.clock() >= self.retry_at:
            self._refreshing = asyncio.ensure_future(self._refresh())
        if self._refreshing is not None and self._must_wait(age):
            await asyncio.shield(self._refreshing)  # too old to trust: wait for the read
        if self.stored is None:
            raise ServiceUnavailable(
                "API keys could not be read from the database; retry shortly",
                code="keys_unavailable",
            )
        stale = self.clock() - self.read_at > self.max_stale_s
        if stale and self.stored:  # keys revoked meanwhile would pass: fail closed
            raise ServiceUnavailable(
                "API keys could not be read from the database for over "
                f"{self.max_stale_s:g} s; retry shortly",
                code="keys_unavailable",
            )
        return self.stored

    def _must_wait(self, age: float) -> bool:
        """Whether a request waits for the read under way: when nothing was read yet, or
        what was read is older than the period, unless reads are failing and it is still
        within ``max_stale_s`` (then the read would only add its timeout to the request)."""
        if self.stored is None:
            return True
        if age < self.refresh_s:
            return False
        return not (self.failing and age <= self.max_stale_s)

    async def _refresh(self) -> None:
        try:
            self.stored = await asyncio.to_thread(self.load)
            self.read_at = self.clock()
            self.failing = False
        except Exception as exc:  # keep serving what was read before, for a while
            log.warning(
                "could not re-read API keys from the database: %s", describe_unavailable(exc)
            )
            self.failing = True
            self.retry_at = self.clock() + self.refresh_s / 2  # soon, not per request
        finally:
            self._refreshing = None

    async def close(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._refreshing
