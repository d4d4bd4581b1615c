"""`laneway api` and `laneway up` refuse to serve an API that others could reach with no
key anywhere (laneway/cli.py ``open_api_problem``, ``guard_open_api``): the address
decision, the three places a key may be, and the explicit opt-out. The real processes
are in tests/integration/test_open_api.py."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from configs.settings import Settings
from laneway.cli import guard_open_api, is_loopback, open_api_problem


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in list(os.environ):
        if key.startswith("LANEWAY_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("LANEWAY_DATA_DIR", str(tmp_path))  # should anything reach for it


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "127.1.2.3",
        "127.255.255.254",
        "::1",
        "[::1]",
        "localhost",
        "LOCALHOST",
        "localhost.",
        "::ffff:127.0.0.1",
    ],
)
def test_loopback_addresses(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize(
    "host",
    [
        "0.0.0.0",
        "::",
        "[::]",
        "",
        "10.1.2.3",
        "192.168.0.10",
        "172.17.0.1",
        "fe80::1",
        "2001:db8::1",
        "::ffff:10.0.0.1",
        "api.example.com",
        "myhost",
        "localhost.example.com",
        "128.0.0.1",
    ],
)
def test_addresses_others_may_reach(host: str) -> None:
    assert not is_loopback(host)


def no_stored_keys() -> bool:
    return False


def test_beyond_loopback_without_any_key_is_a_problem() -> None:
    problem = open_api_problem("0.0.0.0", Settings(), no_stored_keys)
    assert problem is not None and "'0.0.0.0'" in problem and "no API key" in problem


def test_loopback_needs_no_key_and_reads_no_database() -> None:
    def must_not_read() -> bool:
        raise AssertionError("the database was read for a loopback API")

    assert open_api_problem("127.0.0.1", Settings(), must_not_read) is None
    assert open_api_problem("localhost", Settings(), must_not_read) is None


@pytest.mark.parametrize(
    "settings",
    [{"api_key": "k"}, {"api_keys": "alice:ka"}],
    ids=["LANEWAY_API_KEY", "LANEWAY_API_KEYS"],
)
def test_a_static_key_closes_it(settings: dict[str, str]) -> None:
    def must_not_read() -> bool:
        raise AssertionError("the database was read though a static key is set")

    assert open_api_problem("0.0.0.0", Settings(**settings), must_not_read) is None  # type: ignore[arg-type]


def test_a_key_in_the_database_closes_it() -> None:
    assert open_api_problem("::", Settings(), lambda: True) is None


def test_unreadable_database_keys_are_no_proof_of_a_key() -> None:
    def broken() -> bool:
        raise OSError("no such table: api_keys")

    problem = open_api_problem("10.0.0.5", Settings(), broken)
    assert problem is not None and "could not be read" in problem and "no such table" in problem


def test_the_guard_refuses_saying_how_to_fix_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("laneway.cli._stored_keys", no_stored_keys)
    with pytest.raises(SystemExit) as excinfo:
        guard_open_api("0.0.0.0", Settings())
    said = str(excinfo.value)
    for how in ("LANEWAY_API_KEY", "laneway keys create", "127.0.0.1", "LANEWAY_ALLOW_OPEN_API"):
        assert how in said, said


def test_the_opt_out_starts_it_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("laneway.cli._stored_keys", no_stored_keys)
    monkeypatch.setenv("LANEWAY_ALLOW_OPEN_API", "true")
    settings = Settings()
    assert settings.allow_open_api
    with caplog.at_level(logging.WARNING, logger="laneway"):
        guard_open_api("0.0.0.0", settings)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "LANEWAY_ALLOW_OPEN_API" in warnings[0].getMessage()
    assert "no API key" in warnings[0].getMessage()


def test_the_opt_out_is_off_by_default() -> None:
    assert Settings().allow_open_api is False
