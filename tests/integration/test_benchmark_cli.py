"""`laneway benchmark` as a subprocess against a real stack: Redis, a worker serving the
packaged MiniLM and the API. A sweep stores one record per concurrency in the stack's
database; an unknown model exits 2 at once; a model the API serves but no worker loads
(it is in LANEWAY_MODELS, the worker was started without it) fails clearly within the
timeout, naming the command that would serve it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy.orm import Session

from tasks.benchmarks.records import BENCHMARK, for_model
from tasks.store.db import make_engine
from tasks.store.models import BenchmarkRow
from tests.harness import Stack
from tests.integration.helpers import MINILM

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

UNSERVED = "laneway/fake-embeddings"  # served by the API, loaded by no worker


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("benchmark-cli"), models=[MINILM, UNSERVED])
    try:
        stack.start()
        stack.start_worker(models=[MINILM], timeout=180)
        stack.start_api()  # /health says 503 (UNSERVED is cold), and names MINILM warm
        yield stack
    finally:
        stack.close()


def benchmark(stack: Stack, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`python -m laneway benchmark ...` with the stack's URL and database only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LANEWAY_")}
    env.pop("OPENAI_API_KEY", None)
    env |= {"LANEWAY_DATABASE_URL": stack.database_url, "LANEWAY_BASE_URL": stack.base_url}
    return subprocess.run(
        [sys.executable, "-m", "laneway", "benchmark", *args],
        cwd=stack.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def records(stack: Stack, model: str) -> list[BenchmarkRow]:
    engine = make_engine(stack.database_url)
    try:
        with Session(engine) as session:
            rows = for_model(session, model, limit=100)
            return [r for r in rows if r.source == BENCHMARK]
    finally:
        engine.dispose()


def test_a_sweep_stores_a_record_per_concurrency(stack: Stack) -> None:
    result = benchmark(stack, MINILM, "--concurrency", "1,4", "--requests", "20")
    assert result.returncode == 0, result.stderr + stack.logs()
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{MINILM} (embeddings) on TransformersEmbeddingBackend, device cpu")
    run_id = lines[-1].removeprefix("run id: ")
    assert run_id.startswith("run_")

    rows = sorted(records(stack, MINILM), key=lambda r: r.concurrency or 0)
    assert [(r.concurrency, r.requests, r.run_id) for r in rows] == [
        (1, 20, run_id),
        (4, 20, run_id),
    ]
    for row in rows:
        assert (row.capability, row.engine, row.device, row.workers) == (
            "embeddings",
            "TransformersEmbeddingBackend",
            "cpu",
            1,
        )
        assert row.success_rate == 1.0
        assert row.requests_per_s is not None and row.requests_per_s > 0
        assert row.units_per_s is not None and row.units_per_s > row.requests_per_s
        assert row.unit == "tokens"
        assert row.latency_p50_s is not None and row.latency_p95_s is not None
        assert 0 < row.latency_p50_s <= row.latency_p95_s
        assert row.ttft_p50_s is None  # not a stream
        assert row.batch_size is not None and row.batch_size >= 1  # from /metrics
        assert row.context_length == 256  # the catalog's, as /v1/models tells it
        assert row.input_tokens is not None and 100 <= row.input_tokens <= 128
        assert row.sample_response and "384 dimensions" in row.sample_response
        assert row.version and row.created_at == row.updated_at


def test_health_names_the_device_of_each_models_workers(stack: Stack) -> None:
    models = httpx.get(f"{stack.base_url}/health", timeout=10).json()["models"]
    assert models[MINILM]["devices"] == ["cpu"]
    assert models[UNSERVED]["devices"] == []  # no worker loads it
    assert models[MINILM]["engines"] == ["TransformersEmbeddingBackend"]  # the keys before


def test_an_unknown_model_exits_2_at_once(stack: Stack) -> None:
    started = time.monotonic()
    result = benchmark(stack, "nobody/unknown-model", "--timeout", "30")
    assert result.returncode == 2, result.stderr
    assert "does not serve model 'nobody/unknown-model'" in result.stderr
    assert MINILM in result.stderr  # what it does serve
    assert time.monotonic() - started < 20  # no wait for a worker
    assert records(stack, "nobody/unknown-model") == []


def test_a_model_no_worker_serves_fails_within_the_timeout(stack: Stack) -> None:
    started = time.monotonic()
    result = benchmark(stack, UNSERVED, "--timeout", "2")
    assert result.returncode == 3, result.stderr
    assert f"no warm worker serves model '{UNSERVED}'" in result.stderr
    assert "laneway worker --capability embeddings" in result.stderr
    assert time.monotonic() - started < 20
    assert records(stack, UNSERVED) == []
