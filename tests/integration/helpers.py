"""Assertions shared by the integration tests."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import Stack

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
MATRYOSHKA = "test/minilm-matryoshka"
ANY: Any = object()  # "do not check this field"


def assert_openai_error(
    response: httpx.Response,
    status: int,
    *,
    param: Any = ANY,
    code: Any = ANY,
    contains: str | None = None,
) -> dict[str, Any]:
    """``response`` has ``status`` and exactly OpenAI's error shape; returns the error."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    if param is not ANY:
        assert error["param"] == param, error
    if code is not ANY:
        assert error["code"] == code, error
    if contains is not None:
        assert contains in error["message"], error
    return dict(error)


def embed(stack: Stack, text: str = "still serving", model: str = MINILM) -> list[float]:
    response = httpx.post(
        f"{stack.base_url}/v1/embeddings", json={"model": model, "input": text}, timeout=60
    )
    assert response.status_code == 200, response.text
    return list(response.json()["data"][0]["embedding"])


def assert_still_serving(stack: Stack, model: str = MINILM) -> None:
    """The worker still computes and the API still says healthy."""
    vec = embed(stack, model=model)
    assert abs(float(np.linalg.norm(vec)) - 1.0) < 1e-3
    health = httpx.get(f"{stack.base_url}/health", timeout=10)
    assert health.status_code == 200, health.text


def cosine(a: Any, b: Any) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def metrics(stack: Stack) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples of GET /metrics by sample name: [(labels, value), ...]."""
    response = httpx.get(f"{stack.base_url}/metrics", timeout=10)
    assert response.status_code == 200
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def sample(
    samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str
) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(
        value
        for got, value in samples.get(name, [])
        if all(got.get(k) == v for k, v in labels.items())
    )


def keys_cli(stack: Stack, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`laneway keys ...` as an operator runs it, on the stack's database."""
    done = subprocess.run(
        [sys.executable, "-m", "laneway", "keys", *args],
        env=stack.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"laneway keys {' '.join(args)}: {done.stderr}")
    return done


def create_key(stack: Stack, name: str, *extra: str) -> str:
    """A new database key (`laneway keys create`), returned in clear."""
    out = keys_cli(stack, "create", "--name", name, *extra).stdout
    key = out.strip().splitlines()[-1]  # alone on the last line
    assert key.startswith("lw-") and len(key) > 40, out
    return key
