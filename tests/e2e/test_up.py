"""`laneway up` as a user runs it: embedded Redis, SQLite, migrations, a worker, the API,
driven with the official openai client, then stopped with Ctrl-C (SIGINT)."""

from __future__ import annotations

import base64
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from laneway.embedded_redis import free_port
from tests.e2e.up import Up
from tests.harness import pid_alive, tail

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture
def make_up(tmp_path: Path) -> Iterator[Any]:
    made: list[Up] = []

    def make(env: dict[str, str] | None = None) -> Up:
        n = len(made)
        stack = Up(tmp_path / f"data{n}", free_port(), tmp_path / f"up{n}.log", env)
        made.append(stack)
        return stack.start()

    try:
        yield make
    finally:
        for stack in made:
            stack.kill_everything()


def stop_and_check(up: Up, sig: int, within: float = 20) -> None:
    """Send ``sig`` to `laneway up` and assert it and every child are gone in time."""
    assert up.proc is not None
    up.remember_children()
    up.proc.send_signal(sig)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        alive = [pid for pid in up.seen if pid_alive(pid)]
        if not alive and up.proc.poll() is not None:
            break
        time.sleep(0.2)
    alive_now = {pid: cmdline(pid) for pid in up.seen if pid_alive(pid)}
    assert not alive_now, f"still running {within}s after {sig}: {alive_now}\n{tail(up.log, 60)}"
    assert up.proc.poll() == 0, tail(up.log, 60)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{up.base_url}/health", timeout=2)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_up_serves_and_stops_cleanly_on_ctrl_c(make_up: Any, reference_model: Any) -> None:
    up = make_up()
    health = up.wait_healthy(timeout=150)
    assert health["models"][MINILM]["warm"] is True

    children = {pid: cmdline(pid) for pid in up.remember_children()}
    kinds = " | ".join(children.values())
    assert "redis-server" in kinds, kinds  # embedded: no LANEWAY_REDIS_URL was given
    assert "worker" in kinds and " api " in kinds, kinds
    assert (up.data_dir / "laneway.db").is_file()  # SQLite in the data dir, migrated

    client = openai.OpenAI(base_url=f"{up.base_url}/v1", api_key="unused", timeout=60)
    texts = ["laneway up works", "a second sentence for the batch"]
    expected = reference_model.encode(texts)
    as_float = client.embeddings.create(model=MINILM, input=texts, encoding_format="float")
    by_default = client.embeddings.create(model=MINILM, input=texts)  # base64 on the wire
    for a, b, ref in zip(as_float.data, by_default.data, expected, strict=True):
        for vec in (np.asarray(a.embedding), np.asarray(b.embedding)):
            assert vec.shape == (384,)
            assert float(vec @ ref / (np.linalg.norm(vec) * np.linalg.norm(ref))) > 0.999
    raw = httpx.post(
        f"{up.base_url}/v1/embeddings",
        json={"model": MINILM, "input": texts[0], "encoding_format": "base64"},
        timeout=60,
    ).json()
    vec = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(vec, as_float.data[0].embedding, atol=1e-6)
    assert [m.id for m in client.models.list()] == [MINILM]

    stop_and_check(up, signal.SIGINT)  # what Ctrl-C delivers to the foreground process


def test_up_stops_on_sigterm(make_up: Any) -> None:
    up = make_up({"LANEWAY_MODELS": "laneway/fake-embeddings"})
    up.wait_healthy(timeout=120)
    response = httpx.post(
        f"{up.base_url}/v1/embeddings",
        json={"model": "laneway/fake-embeddings", "input": "hi"},
        timeout=30,
    )
    assert response.status_code == 200
    stop_and_check(up, signal.SIGTERM)


def test_up_fails_fast_on_an_unknown_model(make_up: Any) -> None:
    up = make_up({"LANEWAY_MODELS": "nobody/unknown-model"})
    assert up.proc is not None
    code = up.proc.wait(60)
    log = up.log.read_text()
    assert code != 0
    assert "nobody/unknown-model" in log
    assert MINILM in log  # it names the catalog ids
    assert not up.remember_children()
