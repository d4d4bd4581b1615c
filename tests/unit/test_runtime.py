"""The worker runtime and the embeddings engine over the fake backend (no Redis is touched)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import workers.backends as backends_module
from configs.catalog import load_catalog
from configs.settings import Settings
from tasks.errors import ContextLengthExceeded, InvalidRequest, ModelNotFound
from workers.backends.fake import FakeEmbeddingBackend
from workers.embeddings_engine import EmbeddingEngine, EmbedResult
from workers.runtime import WorkerRuntime, off_main_thread

FAKE = "laneway/fake-embeddings"
pytestmark = pytest.mark.timeout(30)


def make_runtime(cache_size: int) -> WorkerRuntime:
    entry = load_catalog().get(FAKE)
    settings = Settings(redis_url="redis://127.0.0.1:1/0", embedding_cache_size=cache_size)
    runtime = WorkerRuntime(settings, capability="embeddings", device="cpu", entries=[entry])
    backend = FakeEmbeddingBackend(entry, device="cpu", model_path="/")
    backend.load()
    backend.warm = True
    runtime.engines[FAKE] = EmbeddingEngine(
        backend, settings.model_copy(update={"max_batch_size": 8})
    )
    return runtime


def fake(runtime: WorkerRuntime) -> EmbeddingEngine:
    return runtime.engine_as(FAKE, EmbeddingEngine)


def embed(runtime: WorkerRuntime, model: str, inputs: list[Any], **kw: Any) -> EmbedResult:
    return runtime.engine_as(model, EmbeddingEngine).embed(inputs, **kw)


@pytest.fixture
def runtime() -> Iterator[WorkerRuntime]:
    rt = make_runtime(cache_size=16)
    yield rt
    for e in rt.engines.values():
        e.stop()


def test_embed_counts_tokens_and_normalises(runtime: WorkerRuntime) -> None:
    result = embed(runtime, FAKE, ["one two three", [5, 6]])
    # the fake tokenizer adds one leading special token per input
    assert result.prompt_tokens == 4 + 3
    assert len(result.vectors) == 2
    for v in result.vectors:
        assert v.shape == (32,)
        assert np.linalg.norm(v) == pytest.approx(1.0, abs=1e-5)


def test_dimensions_truncate_and_renormalise(runtime: WorkerRuntime) -> None:
    full = embed(runtime, FAKE, ["alpha beta"]).vectors[0]
    short = embed(runtime, FAKE, ["alpha beta"], dimensions=16).vectors[0]
    assert short.shape == (16,)
    assert np.linalg.norm(short) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(short, full[:16] / np.linalg.norm(full[:16]), rtol=1e-5)
    with pytest.raises(InvalidRequest):
        embed(runtime, FAKE, ["alpha"], dimensions=12)


def test_cache_hits_skip_compute(runtime: WorkerRuntime) -> None:
    batcher = fake(runtime).batcher
    first = embed(runtime, FAKE, ["cached text", "other"]).vectors
    forwards = batcher.stats.items
    again = embed(runtime, FAKE, ["cached text", "other"]).vectors
    assert batcher.stats.items == forwards  # nothing recomputed
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    cache = fake(runtime).cache
    assert cache.hits == 2
    assert cache.misses == 2
    snap = runtime.metrics_snapshot()["models"][FAKE]
    assert (snap["cache_hits"], snap["cache_misses"]) == (2, 2)


def test_cache_off_recomputes() -> None:
    rt = make_runtime(cache_size=0)
    try:
        embed(rt, FAKE, ["x"])
        embed(rt, FAKE, ["x"])
        assert fake(rt).batcher.stats.items == 2
        assert fake(rt).cache.hits == 0
    finally:
        fake(rt).batcher.stop()


def test_too_long_input_names_the_limit(runtime: WorkerRuntime) -> None:
    with pytest.raises(ContextLengthExceeded, match="128 tokens"):
        embed(runtime, FAKE, [" ".join(["w"] * 200)])


def test_token_ids_outside_the_vocabulary(runtime: WorkerRuntime) -> None:
    with pytest.raises(InvalidRequest, match="outside"):
        embed(runtime, FAKE, [[1, 5000]])


def test_unknown_model(runtime: WorkerRuntime) -> None:
    with pytest.raises(ModelNotFound):
        embed(runtime, "nope", ["x"])


def test_readiness_reports_warm_models(runtime: WorkerRuntime) -> None:
    info = runtime.readiness()
    assert info["models"] == {FAKE: {"warm": True, "engine": "FakeEmbeddingBackend"}}
    assert info["queues"] == ["embeddings.live", "embeddings.batch"]
    assert info["device"] == "cpu"


def test_off_main_thread_returns_and_raises_on_a_thread_that_ends() -> None:
    seen: list[threading.Thread] = []

    def record() -> int:
        seen.append(threading.current_thread())
        return 7

    assert off_main_thread(record, name="x") == 7
    assert seen[0] is not threading.main_thread() and not seen[0].is_alive()
    with pytest.raises(ZeroDivisionError):
        off_main_thread(lambda: 1 / 0, name="y")


def test_start_loads_and_warms_models_off_the_main_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Torch on the main thread would leave an OpenMP pool there for good and slow every
    forward on the scheduler thread (see ``off_main_thread``)."""
    threads: list[threading.Thread] = []

    class Recording(FakeEmbeddingBackend):
        def load(self) -> None:
            threads.append(threading.current_thread())
            super().load()

        def warmup(self) -> None:
            threads.append(threading.current_thread())
            super().warmup()

    monkeypatch.setattr(backends_module, "backend_class", lambda _entry: Recording)
    monkeypatch.setattr(WorkerRuntime, "publish_readiness", lambda self: None)
    monkeypatch.setattr(WorkerRuntime, "_beat_loop", lambda self: None)
    entry = load_catalog().get(FAKE)
    settings = Settings(redis_url="redis://127.0.0.1:1/0")
    rt = WorkerRuntime(settings, capability="embeddings", device="cpu", entries=[entry])
    rt.start()
    try:
        assert len(threads) == 2 and threading.main_thread() not in threads
        assert len(embed(rt, FAKE, ["after start"]).vectors) == 1
    finally:
        for e in rt.engines.values():
            e.stop()
