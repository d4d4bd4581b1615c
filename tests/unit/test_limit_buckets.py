"""Rate-limit buckets are per key, not per key name (api/limits.py ``_keys``): a database
key may be named like a static key ("default" is LANEWAY_API_KEY's, "alice" one of
LANEWAY_API_KEYS'), and must not share its counters. The bucket is named by a prefix of
the key's SHA-256 (``Principal.key_id``, set by ``KeyRing.authenticate``); messages keep
the name. The real Redis script is in tests/integration/test_limit_buckets.py."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping

import pytest

from api.auth import KeyRing, Principal
from api.limits import RateLimiter
from configs.settings import Settings
from tasks.access.keys import KeyRecord, hash_key


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("LANEWAY_"):
            monkeypatch.delenv(key)


def test_same_name_different_keys_get_different_buckets() -> None:
    limiter = RateLimiter(Settings())
    static = Principal("default", None, key_id=hash_key("static-key")[:32])
    stored = Principal("default", "team", key_id=hash_key("db-key")[:32])
    assert limiter._keys(static) != limiter._keys(stored)
    assert set(limiter._keys(static)).isdisjoint(limiter._keys(stored))
    assert limiter._keys(static) == limiter._keys(Principal("renamed", None, key_id=static.key_id))
    for redis_key in limiter._keys(static):
        assert "default" not in redis_key and static.key_id in redis_key


def records(entries: Mapping[str, KeyRecord]) -> KeyRing:
    settings = Settings(api_key="static-key", api_keys="alice:alice-static")  # type: ignore[arg-type]
    return KeyRing(settings, lambda: dict(entries))


def test_authenticate_names_each_key_by_its_hash() -> None:
    ring = records(
        {
            hash_key("db-default"): KeyRecord("default", "team"),
            hash_key("db-alice"): KeyRecord("alice", "bob"),
        }
    )

    async def who(token: str) -> Principal:
        principal = await ring.authenticate(f"Bearer {token}".encode())
        assert principal is not None
        return principal

    async def run() -> dict[str, Principal]:
        tokens = ("static-key", "db-default", "alice-static", "db-alice")
        return {t: await who(t) for t in tokens}

    seen = asyncio.run(run())
    assert seen["static-key"].name == seen["db-default"].name == "default"
    assert seen["alice-static"].name == seen["db-alice"].name == "alice"
    for token, principal in seen.items():
        assert principal.key_id == hash_key(token)[:32]
    limiter = RateLimiter(Settings())
    assert len({limiter._keys(p) for p in seen.values()}) == 4
