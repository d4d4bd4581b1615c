"""One live request, and one batch line, each give one connected OpenTelemetry trace.

The API (``create_app`` through Starlette's test client, lifespan included) and a
worker (its runtime, live consumer and batch runners, serving the fake embeddings model
through the real engine and batcher) run in this process, so that the SDK's in-memory
exporter sees both sides; between them is a real redis-server and a SQLite database.
The trace context crosses over the way it does between processes: in the live task
message's headers, and on the batch's row.

- live: ``POST /v1/embeddings`` (server) -> ``embeddings.live publish`` (producer) ->
  ``embeddings.live process`` (consumer) -> ``forward``;
- batch: ``POST /v1/batches`` (server) -> ``batch chunk`` -> ``batch line`` -> ``forward``,
  with the batch's validation and finalisation in the same trace.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sqlalchemy.orm import sessionmaker

import tasks.queue.celery_app
import tasks.store.db
from api.app import create_app
from configs import tracing
from configs.settings import Settings
from laneway.embedded_redis import start_redis
from tasks.queue.celery_app import make_celery
from tasks.queue.names import LIVE, queue_name
from tasks.store.db import make_engine, migrate
from tests.harness import wait_until
from workers.launcher import capability_entries
from workers.runtime import WorkerRuntime
from workers.tasks import make_batch_runner, make_live_consumer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

FAKE = "laneway/fake-embeddings"
QUEUE = queue_name("embeddings", LIVE)


@pytest.fixture(scope="module")
def exporter() -> Iterator[InMemorySpanExporter]:
    """Tracing on, into memory, for this module only (``tracing.install``)."""
    provider = TracerProvider()
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracing.install(provider)
    try:
        yield memory
    finally:
        tracing.install(None)
        provider.shutdown()


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A real redis-server and a migrated SQLite database, bound for this process."""
    root = tmp_path_factory.mktemp("tracing")
    proc, redis_url = start_redis(root / "redis")
    database_url = f"sqlite:///{root / 'laneway.db'}"
    migrate(database_url)
    engine = make_engine(database_url)
    saved = (tasks.store.db._engine, tasks.store.db._sessions, tasks.queue.celery_app._app)
    tasks.store.db._engine = engine
    tasks.store.db._sessions = sessionmaker(engine, expire_on_commit=False)
    values = {
        "redis_url": redis_url,
        "database_url": database_url,
        "data_dir": root / "data",
        "file_store": root / "files",
        "models": [FAKE],
        "batch_poll_s": 0.05,
        "batch_chunks_in_flight": 1,
    }
    settings = Settings(**values)  # type: ignore[arg-type]
    tasks.queue.celery_app._app = make_celery(settings)  # the batch hints go to our redis
    try:
        yield settings
    finally:
        tasks.store.db._engine, tasks.store.db._sessions, tasks.queue.celery_app._app = saved
        engine.dispose()
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def api(settings: Settings, exporter: InMemorySpanExporter) -> Iterator[TestClient]:
    """A worker (its runtime, live consumer and batch runner) and the API, in-process."""
    runtime = WorkerRuntime(
        settings,
        capability="embeddings",
        device="cpu",
        entries=capability_entries("embeddings", None, settings),
    )
    runtime.start()  # loads the model and says so in Redis: the API's warm check
    live = make_live_consumer(runtime, None)
    runner = make_batch_runner(runtime)
    live.start()
    runner.start()
    try:
        with TestClient(create_app(settings)) as client:
            yield client
    finally:
        live.stop(timeout=5)
        runner.stop(timeout=5)
        runtime.stop()


def trace_of(exporter: InMemorySpanExporter, root_name: str) -> list[ReadableSpan]:
    """The finished spans in the trace of the one span named ``root_name``."""
    roots = [s for s in exporter.get_finished_spans() if s.name == root_name]
    assert len(roots) == 1, [s.name for s in exporter.get_finished_spans()]
    assert roots[0].context is not None
    trace_id = roots[0].context.trace_id
    return [
        s for s in exporter.get_finished_spans() if s.context and s.context.trace_id == trace_id
    ]


def connected(spans: list[ReadableSpan]) -> ReadableSpan:
    """The trace's one root, once every other span's parent is in it."""
    ids = {s.context.span_id for s in spans if s.context}
    roots = [s for s in spans if s.parent is None]
    assert len(roots) == 1, [(s.name, s.parent) for s in spans]
    orphans = [s.name for s in spans if s.parent is not None and s.parent.span_id not in ids]
    assert not orphans, f"spans whose parent is not in the trace: {orphans}"
    return roots[0]


def chain(spans: list[ReadableSpan], leaf: ReadableSpan) -> list[str]:
    """The names from ``leaf`` up to the root."""
    by_id = {s.context.span_id: s for s in spans if s.context}
    names = [leaf.name]
    while leaf.parent is not None:
        leaf = by_id[leaf.parent.span_id]
        names.append(leaf.name)
    return names


def test_one_live_request_gives_one_connected_trace(
    api: TestClient, exporter: InMemorySpanExporter
) -> None:
    exporter.clear()
    response = api.post("/v1/embeddings", json={"model": FAKE, "input": "hello"})
    assert response.status_code == 200, response.text
    request_id = response.headers["x-request-id"]

    def finished() -> list[ReadableSpan]:
        spans = trace_of(exporter, "POST /v1/embeddings")
        return spans if any(s.name == "forward" for s in spans) else []

    spans = wait_until(finished, 10, "the live request's forward span")
    root = connected(spans)
    assert root.kind == SpanKind.SERVER and root.attributes is not None
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["laneway.request_id"] == request_id
    [forward] = [s for s in spans if s.name == "forward"]
    assert chain(spans, forward) == [
        "forward",
        f"{QUEUE} process",
        f"{QUEUE} publish",
        "POST /v1/embeddings",
    ]
    kinds = {s.name: s.kind for s in spans}
    assert kinds[f"{QUEUE} publish"] == SpanKind.PRODUCER
    assert kinds[f"{QUEUE} process"] == SpanKind.CONSUMER
    assert forward.attributes is not None and forward.attributes["laneway.model"] == FAKE
    assert len(spans) == 4


def batch_input(n: int) -> bytes:
    lines = [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": FAKE, "input": f"text {i}"},
        }
        for i in range(n)
    ]
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def run_batch(api: TestClient, content: bytes) -> dict[str, Any]:
    """A batch of ``content`` through the API, waited for until it is completed."""
    upload = api.post("/v1/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"})
    assert upload.status_code == 200, upload.text
    created = api.post(
        "/v1/batches",
        json={
            "input_file_id": upload.json()["id"],
            "endpoint": "/v1/embeddings",
            "completion_window": "24h",
        },
    )
    assert created.status_code == 200, created.text
    batch_id = created.json()["id"]

    def done() -> dict[str, Any] | None:
        body: dict[str, Any] = api.get(f"/v1/batches/{batch_id}").json()
        assert body["status"] not in ("failed", "expired", "cancelled"), body
        return body if body["status"] == "completed" else None

    return dict(wait_until(done, 20, f"batch {batch_id} to complete"))


def test_one_batch_line_gives_one_connected_trace(
    api: TestClient, exporter: InMemorySpanExporter
) -> None:
    exporter.clear()
    batch = run_batch(api, batch_input(1))
    assert batch["request_counts"] == {"total": 1, "completed": 1, "failed": 0}
    spans = wait_until(
        lambda: (
            (s := trace_of(exporter, "POST /v1/batches"))
            and any(x.name == "batch finalize" for x in s)
            and s
        ),
        10,
        "the batch's finalisation span",
    )
    root = connected(spans)
    assert root.name == "POST /v1/batches" and root.kind == SpanKind.SERVER
    [forward] = [s for s in spans if s.name == "forward"]
    assert chain(spans, forward) == ["forward", "batch line", "batch chunk", "POST /v1/batches"]
    [line] = [s for s in spans if s.name == "batch line"]
    assert line.attributes is not None
    assert line.attributes["laneway.batch_id"] == batch["id"]
    assert line.attributes["http.response.status_code"] == 200
    every = ["POST /v1/batches", "batch validate", "batch chunk", "batch line", "forward"]
    assert sorted(s.name for s in spans) == sorted([*every, "batch finalize"])
