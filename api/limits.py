"""Per-key limits: requests and tokens per minute, counted in Redis so that every API
process (on any host) shares them.

Counting is by a sliding window of ``LANEWAY_RATE_LIMIT_WINDOW_S`` (60 s), estimated from
two fixed windows' counters: the current window's count plus the previous window's
weighted by how much of it the sliding window still covers (the estimate Cloudflare and
others use: two counters per key, none per request). Fixed windows alone would let a key
send its whole limit at the end of one window and again at the start of the next, twice
its rate in a few seconds. Windows are numbered by Redis's own clock so that API hosts
whose clocks disagree still count alike.

A request is admitted while its key's estimate is under ``rpm`` requests and under
``tpm`` tokens; past either it is answered 429 with ``Retry-After`` the seconds until the
estimate falls under the limit again. Tokens are known only once a request is answered
(the worker reports its usage), so they are charged then (``TokenMeter``): a request is
never refused halfway, and a key may go over its ``tpm`` by the tokens of the requests
in flight when it reached it.

When Redis cannot be reached the limits are not enforced (logged): a broker outage
already fails the live routes, and must not also lock everyone out of files and batches.
"""

from __future__ import annotations

import logging
import math
from contextvars import ContextVar
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from api.auth import Principal
from configs.settings import Settings
from tasks.errors import RateLimited

log = logging.getLogger(__name__)

PREFIX = "laneway:ratelimit"

# KEYS: requests counter prefix, tokens counter prefix
# ARGV: window (s), then either "admit", rpm (0: none), tpm (0: none)
#                         or "charge", tokens
# -> {0, 0}: admitted (counted) or charged; {1|2, ms until the estimate is under the
# limit}: over requests | tokens. Both modes number the window here and only here.
_SCRIPT = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local window_ms = math.floor(tonumber(ARGV[1]) * 1000)
local n = math.floor(ms / window_ms)
local into = ms - n * window_ms
if ARGV[2] == 'charge' then
  local tok = KEYS[2] .. ':' .. n
  redis.call('INCRBY', tok, ARGV[3])
  redis.call('PEXPIRE', tok, window_ms * 2)
  return {0, 0}
end
-- ms until prev * (window - t) / window + cur < limit, t the time into a window
local function wait_ms(prefix, limit)
  if limit <= 0 then return 0 end
  local cur = tonumber(redis.call('GET', prefix .. ':' .. n) or '0')
  local prev = tonumber(redis.call('GET', prefix .. ':' .. (n - 1)) or '0')
  if prev * (window_ms - into) / window_ms + cur < limit then return 0 end
  if cur >= limit then  -- past this window's end, cur is the one fading out
    return window_ms - into + math.floor(window_ms * (1 - limit / cur)) + 1
  end
  return math.floor(window_ms * (1 - (limit - cur) / prev)) - into + 1
end
local over = wait_ms(KEYS[1], tonumber(ARGV[3]))
if over > 0 then return {1, over} end
over = wait_ms(KEYS[2], tonumber(ARGV[4]))
if over > 0 then return {2, over} end
local req = KEYS[1] .. ':' .. n
redis.call('INCR', req)
redis.call('PEXPIRE', req, window_ms * 2)
return {0, 0}
"""


@dataclass
class TokenMeter:
    """The tokens one request used, added up as its replies arrive (``charge``)."""

    tokens: int = 0


METER: ContextVar[TokenMeter | None] = ContextVar("laneway_token_meter", default=None)


def charge(usage: object) -> None:
    """Count a reply's ``usage`` (prompt plus completion tokens) against the current
    request's key; nothing outside a metered request."""
    meter = METER.get()
    if meter is None or not isinstance(usage, dict):
        return
    for field_name in ("prompt_tokens", "completion_tokens"):
        value = usage.get(field_name)
        if isinstance(value, int) and value > 0:
            meter.tokens += value


@dataclass
class RateLimiter:
    settings: Settings
    # the script by client: EVALSHA sends its digest, not its text, per request
    _scripts: dict[int, AsyncScript] = field(default_factory=dict)

    async def _run(self, redis: aioredis.Redis, who: Principal, *args: str | int) -> list[int]:
        script = self._scripts.get(id(redis))
        if script is None:
            script = redis.register_script(_SCRIPT)
            self._scripts = {id(redis): script}  # one client per process
        window = self.settings.rate_limit_window_s
        return await script(keys=self._keys(who), args=[window, *args])  # type: ignore[no-any-return]

    def limits(self, who: Principal) -> tuple[int, int]:
        rpm = who.rpm if who.rpm is not None else self.settings.rate_limit_rpm
        tpm = who.tpm if who.tpm is not None else self.settings.rate_limit_tpm
        return rpm, tpm

    def _keys(self, who: Principal) -> tuple[str, str]:
        base = f"{PREFIX}:{who.name}"
        return f"{base}:requests", f"{base}:tokens"

    async def admit(self, redis: aioredis.Redis, who: Principal) -> None:
        """Count one request of ``who``, or raise ``RateLimited`` (429)."""
        rpm, tpm = self.limits(who)
        if not rpm and not tpm:
            return
        try:
            over, left_ms = await self._run(redis, who, "admit", rpm, tpm)
        except (RedisError, OSError) as exc:
            log.warning("rate limits not enforced: Redis is unreachable (%s)", exc)
            return
        if not over:
            return
        what, limit = ("requests", rpm) if over == 1 else ("tokens", tpm)
        window = self.settings.rate_limit_window_s
        seconds = max(1, math.ceil(int(left_ms) / 1000))
        raise RateLimited(
            f"Rate limit reached for key {who.name!r} on {what} per {window:g}s: limit "
            f"{limit}. Please try again in {seconds}s.",
            retry_after=seconds,
        )

    async def settle(self, redis: aioredis.Redis, who: Principal, meter: TokenMeter) -> None:
        """Charge what a finished request used to its key's tokens."""
        _, tpm = self.limits(who)
        if not tpm or meter.tokens <= 0:
            return
        try:
            await self._run(redis, who, "charge", meter.tokens)
        except (RedisError, OSError) as exc:
            log.warning("could not count %d tokens of %s: %s", meter.tokens, who.name, exc)
