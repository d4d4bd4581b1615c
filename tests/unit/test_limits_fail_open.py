"""With Redis unreachable, rate limits let requests through (logged) and hold nothing:
files and batches must not go down with the broker (api/limits.py)."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest
import redis.asyncio as aioredis

from api.auth import Principal
from api.limits import RateLimiter
from configs.settings import Settings


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_limits_are_not_enforced_while_redis_is_unreachable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limiter = RateLimiter(Settings(rate_limit_rpm=1, rate_limit_tpm=1))
    who = Principal("k", "k")

    async def run() -> None:
        client = aioredis.Redis.from_url(f"redis://127.0.0.1:{closed_port()}/0")
        try:
            for _ in range(3):  # over rpm 1 if anything counted
                await limiter.admit(client, who)
            meter = limiter.meter(client, who)
            assert meter.hold is not None
            await meter.hold(meter, 10**6)  # would be "too large" for tpm 1
            assert meter.held == 0  # nothing held, so nothing to give back
            meter.tokens = 5
            await limiter.settle(client, who, meter)
        finally:
            await client.aclose()

    with caplog.at_level(logging.WARNING, logger="api.limits"):
        asyncio.run(run())
    assert "rate limits not enforced" in caplog.text
    assert "could not count 5 tokens of k" in caplog.text
