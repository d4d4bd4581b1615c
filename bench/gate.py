"""What the API's gate costs per request: authenticating a key from memory and admitting
it under rate limits (one EVALSHA; with a tokens limit, two more to hold and settle its
tokens), each next to the raw operation it is built on, measured in the same run.

    .venv/bin/python bench/gate.py [--keys 10000] [--calls 5000]

Prints, per request: ``KeyRing.authenticate`` with ``--keys`` keys in memory against one
SHA-256 of the key (the part no ring can avoid), and ``RateLimiter.admit`` (the sliding
window script) against a bare Redis ``PING`` round trip to the same embedded
redis-server, and holding then settling a request's tokens (two scripts) against two
PINGs. Not part of the test run.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import redis.asyncio as aioredis

from api.auth import KeyRing, Principal
from api.limits import RateLimiter
from configs.settings import Settings
from laneway.embedded_redis import start_redis
from tasks.access.keys import KeyRecord, hash_key


async def per_call(calls: int, step: Callable[[], Awaitable[object]]) -> float:
    for _ in range(min(200, calls)):  # warm: connections, script cache
        await step()
    began = time.perf_counter()
    for _ in range(calls):
        await step()
    return (time.perf_counter() - began) / calls


async def authentication(keys: int, calls: int) -> tuple[float, float]:
    records = {
        hash_key(f"lw-{i:064x}"): KeyRecord(name=f"k{i}", owner=f"k{i}") for i in range(keys)
    }
    ring = KeyRing(Settings(keys_refresh_s=3600), lambda: records)
    header = f"Bearer lw-{keys // 2:064x}".encode()
    ring_s = await per_call(calls, lambda: ring.authenticate(header))

    async def digest() -> str:
        return hash_key(header[7:])

    return ring_s, await per_call(calls, digest)


async def admission(url: str, calls: int) -> tuple[float, float, float]:
    """Per request: admit; hold and settle tokens (two scripts); one PING."""
    client = aioredis.Redis.from_url(url)
    limiter = RateLimiter(Settings(rate_limit_rpm=10**9, rate_limit_tpm=10**9))
    who = Principal("bench", "bench")

    async def hold_and_settle() -> None:
        meter = limiter.meter(client, who)
        assert meter.hold is not None
        await meter.hold(meter, 100)
        meter.tokens = 90
        await limiter.settle(client, who, meter)

    try:
        admit_s = await per_call(calls, lambda: limiter.admit(client, who))
        tokens_s = await per_call(calls, hold_and_settle)
        ping_s = await per_call(calls, client.ping)
    finally:
        await client.aclose()
    return admit_s, tokens_s, ping_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--calls", type=int, default=5_000)
    args = parser.parse_args()
    ring_s, digest_s = asyncio.run(authentication(args.keys, args.calls))
    with tempfile.TemporaryDirectory() as root:
        proc, url = start_redis(Path(root))
        try:
            admit_s, tokens_s, ping_s = asyncio.run(admission(url, args.calls))
        finally:
            proc.terminate()
            proc.wait(10)
    print(
        f"authenticate ({args.keys} keys): {ring_s * 1e6:7.1f} us; "
        f"SHA-256 alone {digest_s * 1e6:.1f} us; ratio {ring_s / digest_s:.2f}"
    )
    print(
        f"admit (sliding window):   {admit_s * 1e3:7.3f} ms; "
        f"PING alone {ping_s * 1e3:.3f} ms; ratio {admit_s / ping_s:.2f}"
    )
    print(
        f"hold + settle tokens:     {tokens_s * 1e3:7.3f} ms; "
        f"two PINGs {2 * ping_s * 1e3:.3f} ms; ratio {tokens_s / (2 * ping_s):.2f}"
    )


if __name__ == "__main__":
    main()
