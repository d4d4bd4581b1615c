"""Bounded pushes onto the live queues, many per Redis round trip.

Every request handled in one turn of the event loop has its message pushed by the same
script call: the bound check and the pushes are atomic (so several API processes share
the bound exactly), and under load one round trip carries tens of requests instead of
one each.
"""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

# KEYS[1] the queue, ARGV[1] its bound, ARGV[2..] messages: for each, the queue's depth
# after its push, or -depth when the queue was full and it was not pushed
BOUNDED_PUSH = """
local bound = tonumber(ARGV[1])
local depth = redis.call('LLEN', KEYS[1])
local out = {}
for i = 2, #ARGV do
    if depth >= bound then
        out[#out + 1] = -depth
    else
        depth = redis.call('LPUSH', KEYS[1], ARGV[i])
        out[#out + 1] = depth
    end
end
return out
"""


class BoundedPublisher:
    def __init__(self, redis: aioredis.Redis, bound: int) -> None:
        self.bound = bound
        self._script = redis.register_script(BOUNDED_PUSH)
        self._waiting: dict[str, list[tuple[str, asyncio.Future[int]]]] = {}
        self._flushing: asyncio.Task[None] | None = None

    async def push(self, queue: str, message: str) -> int:
        """The queue's depth after the push, or ``-depth`` when it was full."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(queue, []).append((message, future))
        if self._flushing is None:
            self._flushing = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # let the rest of this turn's requests join
        waiting, self._waiting, self._flushing = self._waiting, {}, None
        await asyncio.gather(*(self._send(q, items) for q, items in waiting.items()))

    async def _send(self, queue: str, items: list[tuple[str, asyncio.Future[int]]]) -> None:
        try:
            depths = await self._script(keys=[queue], args=[self.bound, *(m for m, _ in items)])
        except asyncio.CancelledError:
            for _, future in items:
                future.cancel()
            raise
        except Exception as exc:  # each caller hears of it (503 broker_unavailable)
            for _, future in items:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), depth in zip(items, depths, strict=True):
            if not future.done():
                future.set_result(int(depth))
