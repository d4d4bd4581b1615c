"""Keys and owners as pure logic: the bearer header, the key ring's refresh and refusals,
owner-scoped idempotency keys, the settings' static list and the token meter. The real
database, CLI, Redis and API processes are in tests/integration/test_keys.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

import pytest
from pydantic import ValidationError

from api.auth import KeyRing, Principal, bearer_token
from api.limits import METER, RateLimiter, TokenMeter, charge
from configs.settings import Settings
from tasks.access.keys import KeyRecord, check_name, hash_key
from tasks.access.tenancy import scoped_idempotency_key
from tasks.errors import AuthenticationFailed, InvalidRequest, ServiceUnavailable


class Loader:
    """The database's keys, as the ring reads them; ``fail`` makes a read raise."""

    def __init__(self, records: Mapping[str, KeyRecord] | None = None) -> None:
        self.records = dict(records or {})
        self.reads = 0
        self.fail = False

    def __call__(self) -> Mapping[str, KeyRecord]:
        self.reads += 1
        if self.fail:
            raise OSError("database down")
        return dict(self.records)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def ring(loader: Loader, clock: Clock | None = None, **settings: object) -> KeyRing:
    return KeyRing(Settings(keys_refresh_s=2.0, **settings), loader, clock or Clock())  # type: ignore[arg-type]


def auth(keys: KeyRing, header: bytes | None) -> Principal | None:
    async def go() -> Principal | None:
        principal = await keys.authenticate(header)
        if keys._refreshing is not None:  # let a background re-read finish
            await keys._refreshing
        return principal

    return asyncio.run(go())


@pytest.mark.parametrize(
    "header",
    [
        None,
        b"",
        b"Bearer",
        b"Bearer   ",
        b"Basic abc",
        b"Token x",
        b"Bearer a b",
        b"Bearer " + b"k" * 600,
    ],
)
def test_bearer_token_refuses_what_is_not_one_key(header: bytes | None) -> None:
    with pytest.raises(AuthenticationFailed):
        bearer_token(header)


def test_bearer_token_takes_any_case_and_outer_spaces() -> None:
    assert bearer_token(b"  bearer lw-abc  ") == b"lw-abc"
    assert bearer_token(b"BEARER lw-abc") == b"lw-abc"


def test_no_key_anywhere_is_open() -> None:
    assert auth(ring(Loader()), None) is None


def test_static_keys_name_their_owners() -> None:
    keys = ring(Loader(), api_key="legacy", api_keys="alice:ka,bob:kb")
    assert auth(keys, b"Bearer legacy") == Principal("default", None)
    assert auth(keys, b"Bearer ka") == Principal("alice", "alice")
    with pytest.raises(AuthenticationFailed):
        auth(keys, None)


def test_database_keys_revoked_expired_and_limits() -> None:
    loader = Loader(
        {
            hash_key("good"): KeyRecord("a", "team", rpm=5, tpm=None),
            hash_key("gone"): KeyRecord("b", "team", revoked_at=1),
            hash_key("old"): KeyRecord("c", "team", expires_at=int(time.time()) - 1),
        }
    )
    keys = ring(loader)
    assert auth(keys, b"Bearer good") == Principal("a", "team", 5, None)
    for token, code in (
        (b"gone", "key_revoked"),
        (b"old", "key_expired"),
        (b"x", "invalid_api_key"),
    ):
        with pytest.raises(AuthenticationFailed) as refused:
            auth(keys, b"Bearer " + token)
        assert refused.value.code == code


def test_a_revoked_key_stays_closed_even_when_it_was_the_last() -> None:
    keys = ring(Loader({hash_key("k"): KeyRecord("k", "k", revoked_at=1)}))
    with pytest.raises(AuthenticationFailed):
        auth(keys, None)


def test_keys_are_re_read_in_the_background_after_half_the_interval() -> None:
    loader, clock = Loader(), Clock()
    keys = ring(loader, clock)
    assert auth(keys, None) is None and loader.reads == 1
    loader.records[hash_key("new")] = KeyRecord("n", "n")
    clock.now = 0.9
    assert auth(keys, None) is None and loader.reads == 1  # still fresh
    clock.now = 1.2
    assert auth(keys, None) is None  # answered from what was read; the re-read starts
    assert loader.reads == 2
    with pytest.raises(AuthenticationFailed):
        auth(keys, None)
    assert auth(keys, b"Bearer new") == Principal("n", "n")


def test_an_idle_process_waits_for_keys_older_than_the_interval() -> None:
    """A key revoked while a process was idle is refused on its very next request: keys
    read longer ago than LANEWAY_KEYS_REFRESH_S are read again before answering."""
    loader, clock = Loader({hash_key("k"): KeyRecord("k", "k")}), Clock()
    keys = ring(loader, clock)
    assert auth(keys, b"Bearer k") == Principal("k", "k")
    loader.records[hash_key("k")] = KeyRecord("k", "k", revoked_at=1)
    clock.now = 60.0  # an hour of quiet would do the same
    with pytest.raises(AuthenticationFailed) as refused:
        auth(keys, b"Bearer k")
    assert refused.value.code == "key_revoked"


def test_a_failed_re_read_keeps_the_keys_read_before() -> None:
    loader, clock = Loader({hash_key("k"): KeyRecord("k", "k")}), Clock()
    keys = ring(loader, clock)
    assert auth(keys, b"Bearer k") is not None
    loader.fail, clock.now = True, 10.0
    assert auth(keys, b"Bearer k") is not None
    assert auth(keys, b"Bearer k") is not None
    assert loader.reads == 2  # the failed read is not retried on every request


def test_while_reads_fail_requests_do_not_wait_for_the_next() -> None:
    """The database away (a read that hangs until the connect timeout): requests answer
    from the keys read before, within LANEWAY_KEYS_MAX_STALE_S, without waiting."""
    loader, clock = Loader({hash_key("k"): KeyRecord("k", "k")}), Clock()
    keys = ring(loader, clock, keys_max_stale_s=30)
    assert auth(keys, b"Bearer k") is not None
    loader.fail, clock.now = True, 10.0
    assert auth(keys, b"Bearer k") is not None  # the first failed read: waited for
    release = asyncio.Event()

    async def go() -> Principal | None:
        async def slow_refresh() -> None:
            await release.wait()  # a read that does not come back

        clock.now = 20.0
        keys.retry_at = float("-inf")
        keys._refresh = slow_refresh  # type: ignore[method-assign]
        principal = await asyncio.wait_for(keys.authenticate(b"Bearer k"), timeout=1)
        assert keys._refreshing is not None  # a read is under way; nobody waits for it
        release.set()
        await keys._refreshing
        return principal

    assert asyncio.run(go()) == Principal("k", "k")


def test_keys_unreadable_past_the_bound_are_refused_until_read_again() -> None:
    """Fail closed: past LANEWAY_KEYS_MAX_STALE_S without a read, database keys are 503
    (a key revoked meanwhile must not pass); static keys need no read and still pass."""
    loader, clock = Loader({hash_key("k"): KeyRecord("k", "k")}), Clock()
    keys = ring(loader, clock, keys_max_stale_s=30, api_keys="ops:static-key")
    assert auth(keys, b"Bearer k") is not None
    loader.fail = True
    clock.now = 29.0
    assert auth(keys, b"Bearer k") is not None  # within the bound: what was read before
    clock.now = 31.0
    with pytest.raises(ServiceUnavailable):
        auth(keys, b"Bearer k")
    assert auth(keys, b"Bearer static-key") == Principal("ops", "ops")
    loader.fail, clock.now = False, 40.0
    assert auth(keys, b"Bearer k") is not None


def test_an_open_api_stays_open_while_its_keys_cannot_be_read() -> None:
    """No key was read (none exists), and none can be made while the database is away:
    live routes keep working through an outage."""
    loader, clock = Loader(), Clock()
    keys = ring(loader, clock, keys_max_stale_s=30)
    assert auth(keys, None) is None
    loader.fail, clock.now = True, 300.0
    assert auth(keys, None) is None


def test_keys_never_read_are_503_not_open() -> None:
    loader = Loader()
    loader.fail = True
    with pytest.raises(ServiceUnavailable):
        auth(ring(loader), None)


def test_idempotency_keys_are_scoped_by_owner() -> None:
    assert scoped_idempotency_key(None, "alice") is None
    alice, bob = scoped_idempotency_key("k", "alice"), scoped_idempotency_key("k", "bob")
    assert alice != bob and alice is not None and len(alice) <= 256
    # the owner None's keys are digested too: no value it sends is another's stored key
    nobody = scoped_idempotency_key("k", None)
    assert nobody not in ("k", alice, bob) and nobody is not None and len(nobody) <= 256
    assert scoped_idempotency_key(alice, None) != alice
    with pytest.raises(InvalidRequest):
        scoped_idempotency_key("bad\x00key", "alice")


def test_settings_static_keys_are_name_key_pairs() -> None:
    assert Settings(api_keys="a:1, b:2:3").api_keys == ["a:1", "b:2:3"]
    for bad in ("nokey", ":k", "a:", "a b:k", "x" * 65 + ":k"):
        with pytest.raises(ValidationError):
            Settings(api_keys=bad)


def test_key_names() -> None:
    assert check_name("team-1.prod_x") == "team-1.prod_x"
    for bad in ("", "-x", "a b", "x" * 65, "é"):
        with pytest.raises(InvalidRequest):
            check_name(bad)


def test_limits_default_to_the_settings_and_zero_is_none() -> None:
    limiter = RateLimiter(Settings(rate_limit_rpm=10, rate_limit_tpm=100))
    assert limiter.limits(Principal("a", "a")) == (10, 100)
    assert limiter.limits(Principal("a", "a", rpm=0, tpm=5)) == (0, 5)


def test_the_meter_adds_prompt_and_completion_tokens_of_its_request_only() -> None:
    charge({"prompt_tokens": 5})  # no request: nothing to count
    meter = TokenMeter()
    token = METER.set(meter)
    try:
        charge({"prompt_tokens": 5, "completion_tokens": 7})
        charge({"prompt_tokens": "9", "completion_tokens": -1})  # not counts
        charge(None)
    finally:
        METER.reset(token)
    assert meter.tokens == 12
