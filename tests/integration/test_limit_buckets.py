"""A database key named like a static key has its own rate-limit counters, through the
real key ring and the limiter's script on a real redis-server: with one request a window
allowed, the static "default" key spending its request leaves the database's "default"
key its own (both 429 saying 'default' once spent)."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis

from api.auth import KeyRing, Principal
from api.limits import RateLimiter
from configs.settings import Settings
from laneway.embedded_redis import start_redis
from tasks.access.keys import KeyRecord, hash_key
from tasks.errors import RateLimited

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc: subprocess.Popen[bytes]
    proc, url = start_redis(tmp_path_factory.mktemp("buckets") / "redis")
    try:
        yield url
    finally:
        proc.kill()
        proc.wait(10)


def test_a_database_key_named_like_a_static_one_has_its_own_bucket(
    server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in list(os.environ):
        if key.startswith("LANEWAY_"):
            monkeypatch.delenv(key)
    settings = Settings(api_key="static-key", rate_limit_rpm=1, rate_limit_window_s=60)  # type: ignore[arg-type]
    ring = KeyRing(settings, lambda: {hash_key("db-key"): KeyRecord("default", "team")})
    limiter = RateLimiter(settings)

    async def run() -> None:
        client = aioredis.Redis.from_url(server)
        try:

            async def who(token: str) -> Principal:
                principal = await ring.authenticate(f"Bearer {token}".encode())
                assert principal is not None and principal.name == "default"
                return principal

            static, stored = await who("static-key"), await who("db-key")
            await limiter.admit(client, static)
            await limiter.admit(client, stored)  # a bucket of its own: not 429
            for principal in (static, stored):
                with pytest.raises(RateLimited, match="key 'default'"):
                    await limiter.admit(client, principal)
        finally:
            await client.aclose()

    asyncio.run(run())
