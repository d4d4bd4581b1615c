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
estimate falls under the limit again. That much is decided from the headers alone.

Tokens are known only once a request is answered, so a live request first holds what it
may use (``estimate_tokens``: its capability's contract says how much, e.g. its text at
four characters a token, the token ids it sends, and ``max_tokens`` for each choice),
once its body is parsed and before it is enqueued (``reserve``). The hold counts like
used tokens, so requests in flight cannot together go past ``tpm``; one that would not
fit is answered 429 before any work is done.
When the answer is in, the hold is settled against the usage the worker reported
(``TokenMeter``): more is charged, the rest given back to the window it was held in. A
request that fails or is abandoned gives its whole hold back.

When Redis cannot be reached the limits are not enforced (logged): a broker outage
already fails the live routes, and must not also lock everyone out of files and batches.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from api.auth import Principal
from configs.capabilities import REGISTRY
from configs.settings import Settings
from tasks.contracts.base import CHARS_PER_TOKEN
from tasks.errors import RateLimited

log = logging.getLogger(__name__)

PREFIX = "laneway:ratelimit"

# KEYS: requests counter prefix, tokens counter prefix
# ARGV: window (s), then one of
#   "admit", rpm (0: none), tpm (0: none)  -> {0, 0} counted | {1|2, ms}: over requests|tokens
#   "reserve", tpm, tokens                 -> {0, window number} held | {2, ms} | {3, 0}: the
#                                             tokens alone are over tpm
#   "charge", tokens (< 0: give back), the window number they were held in  -> {0, 0}
# ms: until the estimate is under the limit. The window is numbered here and only here.
_SCRIPT = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local window_ms = math.floor(tonumber(ARGV[1]) * 1000)
local n = math.floor(ms / window_ms)
local into = ms - n * window_ms
local function add(prefix, amount)
  local key = prefix .. ':' .. n
  redis.call('INCRBY', key, amount)
  redis.call('PEXPIRE', key, window_ms * 2)
end
if ARGV[2] == 'charge' then
  local delta = tonumber(ARGV[3])
  if delta > 0 then add(KEYS[2], delta) return {0, 0} end
  local held = KEYS[2] .. ':' .. ARGV[4]  -- gone once it no longer counts
  local left = tonumber(redis.call('GET', held) or '0')
  if left > 0 then redis.call('DECRBY', held, math.min(left, -delta)) end
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
if ARGV[2] == 'reserve' then
  local tpm, want = tonumber(ARGV[3]), tonumber(ARGV[4])
  if want > tpm then return {3, 0} end
  local over = wait_ms(KEYS[2], tpm - want + 1)  -- held + want <= tpm
  if over > 0 then return {2, over} end
  add(KEYS[2], want)
  return {0, n}
end
local over = wait_ms(KEYS[1], tonumber(ARGV[3]))
if over > 0 then return {1, over} end
over = wait_ms(KEYS[2], tonumber(ARGV[4]))
if over > 0 then return {2, over} end
add(KEYS[1], 1)
return {0, 0}
"""


def estimate_tokens(capability: str, payload: Mapping[str, Any]) -> int:
    """The tokens a live request of ``capability`` may use, known before it runs: its
    contract's ``estimate_tokens`` hook (every contract declares one; what it cannot know
    yet is charged when the answer is in)."""
    return int(REGISTRY[capability].contract_module().estimate_tokens(payload))


@dataclass
class TokenMeter:
    """One request's tokens: what it holds (``reserve``) and what its replies say it
    used (``charge``), settled against each other when it ends (``RateLimiter.settle``).
    ``hold`` is set when its key has a tokens-per-minute limit."""

    tokens: int = 0
    held: int = 0
    held_in: int = 0  # the window number the hold was counted in
    hold: Callable[[TokenMeter, int], Awaitable[None]] | None = None


METER: ContextVar[TokenMeter | None] = ContextVar("laneway_token_meter", default=None)


async def reserve(capability: str, payload: Mapping[str, Any]) -> None:
    """Hold the tokens the live request ``payload`` (of ``capability``) may use against the
    current request's key, or raise ``RateLimited``; nothing outside a metered request or
    without a ``tpm``."""
    meter = METER.get()
    if meter is not None and meter.hold is not None:
        await meter.hold(meter, estimate_tokens(capability, payload))


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
        # by the key's hash, not its name: a database key may be named like a static key
        # (a Principal made by hand, in tests and benches, has no key_id: its name then)
        base = f"{PREFIX}:{who.key_id or 'name:' + who.name}"
        return f"{base}:requests", f"{base}:tokens"

    async def admit(self, redis: aioredis.Redis, who: Principal) -> None:
        """Count one request of ``who``, or raise ``RateLimited`` (429)."""
        rpm, tpm = self.limits(who)
        if not rpm and not tpm:
            return
        answer = await self._enforced(redis, who, "admit", rpm, tpm)
        if answer is not None and answer[0]:
            raise self._over(who, "requests" if answer[0] == 1 else "tokens", answer[1])

    async def _enforced(
        self, redis: aioredis.Redis, who: Principal, *args: str | int
    ) -> tuple[int, int] | None:
        """The script's answer, or None (let it through) when Redis is unreachable."""
        try:
            over, value = await self._run(redis, who, *args)
        except (RedisError, OSError) as exc:
            log.warning("rate limits not enforced: Redis is unreachable (%s)", exc)
            return None
        return int(over), int(value)

    def _over(self, who: Principal, what: str, left_ms: int) -> RateLimited:
        limit = self.limits(who)[what == "tokens"]
        window = self.settings.rate_limit_window_s
        seconds = max(1, math.ceil(left_ms / 1000))
        return RateLimited(
            f"Rate limit reached for key {who.name!r} on {what} per {window:g}s: limit "
            f"{limit}. Please try again in {seconds}s.",
            retry_after=seconds,
        )

    def meter(self, redis: aioredis.Redis, who: Principal) -> TokenMeter:
        """A request's meter; one that holds tokens when ``who`` has a ``tpm``."""
        if not self.limits(who)[1]:
            return TokenMeter()
        return TokenMeter(hold=partial(self._hold, redis, who))

    async def _hold(
        self, redis: aioredis.Redis, who: Principal, meter: TokenMeter, tokens: int
    ) -> None:
        tpm = self.limits(who)[1]
        if tokens <= 0:
            return
        answer = await self._enforced(redis, who, "reserve", tpm, tokens)
        if answer is None:
            return
        over, value = answer
        if over == 3:
            window = self.settings.rate_limit_window_s
            raise RateLimited(
                f"Request too large for key {who.name!r} on tokens per {window:g}s: limit "
                f"{tpm}, requested about {tokens} (the input at {CHARS_PER_TOKEN} characters "
                "a token, plus max_tokens for each choice). Reduce the input or max_tokens.",
                retry_after=math.ceil(window),
            )
        if over:
            raise self._over(who, "tokens", value)
        meter.held += tokens
        meter.held_in = value

    async def settle(self, redis: aioredis.Redis, who: Principal, meter: TokenMeter) -> None:
        """Charge what a finished request used to its key's tokens, less what it held."""
        _, tpm = self.limits(who)
        delta = meter.tokens - meter.held
        if not tpm or delta == 0:
            return
        try:
            await self._run(redis, who, "charge", delta, meter.held_in)
        except (RedisError, OSError) as exc:
            log.warning("could not count %d tokens of %s: %s", delta, who.name, exc)
