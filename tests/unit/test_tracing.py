"""configs.tracing: off unless the standard OTEL_* variables ask for it, and the trace
context's round trip through a live task message (``celery_message`` and
``decode_message``), a worker's consumer span and the per-request forward spans.

The whole path (the API, Redis, the worker, a batch line) is
tests/integration/test_tracing.py."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from configs import tracing
from tasks.queue.publish import celery_message, decode_message
from workers.jobs import JobMeta

OTEL_VARS = (
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No OTEL_* variable from the developer's shell."""
    for name in OTEL_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on for the test, into memory (what a test installs instead of ``setup``)."""
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    try:
        yield exporter
    finally:
        tracing.install(None)
        provider.shutdown()


def by_name(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    return {s.name: s for s in exporter.get_finished_spans()}


# -- on or off ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({}, []),  # off by default, unlike the SDK's own default of otlp
        ({"OTEL_TRACES_EXPORTER": "none"}, []),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "Console, otlp,none"}, ["console", "otlp"]),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, ["otlp"]),
        # an explicit "none" wins over an endpoint set for other signals
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, []),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, []),
        ({"OTEL_SDK_DISABLED": "false", "OTEL_TRACES_EXPORTER": "console"}, ["console"]),
    ],
)
def test_tracing_is_on_only_when_the_standard_variables_ask(
    env: dict[str, str], names: list[str]
) -> None:
    assert tracing.exporter_names(env) == names


def test_off_makes_no_provider_and_leaves_the_tracer_unset() -> None:
    assert tracing.make_provider("laneway-api") is None
    assert tracing.setup("laneway-api") is False
    assert tracing.TRACER is None
    assert tracing.inject() is None  # nothing to carry


def test_the_service_name_defaults_per_process_unless_the_environment_names_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    provider = tracing.make_provider("laneway-worker-embeddings")
    assert provider is not None
    assert provider.resource.attributes["service.name"] == "laneway-worker-embeddings"
    provider.shutdown()
    monkeypatch.setenv("OTEL_SERVICE_NAME", "embedder-gpu-3")
    provider = tracing.make_provider("laneway-worker-embeddings")
    assert provider is not None
    assert provider.resource.attributes["service.name"] == "embedder-gpu-3"
    provider.shutdown()


def test_the_sdk_reads_the_sampler_and_the_otlp_exporter_its_own_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://127.0.0.1:9/v1/traces")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    provider = tracing.make_provider("laneway-api")
    assert provider is not None
    assert provider.sampler is ALWAYS_OFF
    processors = provider._active_span_processor._span_processors
    assert [type(p).__name__ for p in processors] == ["BatchSpanProcessor"]
    exporter: Any = processors[0]._batch_processor._exporter  # type: ignore[attr-defined]
    assert type(exporter).__name__ == "OTLPSpanExporter"
    assert exporter._endpoint == "http://127.0.0.1:9/v1/traces"
    provider.shutdown()


def test_an_unknown_exporter_is_ignored() -> None:
    assert tracing.make_provider("laneway-api", {"OTEL_TRACES_EXPORTER": "zipkin"}) is None


# -- the task message ---------------------------------------------------------------------------


def payload() -> dict[str, Any]:
    return {"model": "m", "input": ["x"], "id": "req-1", "reply_to": "r", "sent_at": 1.0}


def test_off_the_message_is_exactly_celerys() -> None:
    raw = celery_message("embeddings.live", [payload()], queue="embeddings.live", task_id="t")
    headers = orjson.loads(raw)["headers"]
    assert "traceparent" not in headers and "tracestate" not in headers
    assert decode_message(raw).trace is None


def test_the_trace_context_round_trips_through_the_task_message(
    spans: InMemorySpanExporter,
) -> None:
    assert tracing.TRACER is not None
    with tracing.publish_span("embeddings.live", "req-1") as producer:
        carrier = tracing.inject()
    assert carrier is not None and set(carrier) <= set(tracing.HEADERS)
    raw = celery_message(
        "embeddings.live", [payload()], queue="embeddings.live", task_id="t", trace=carrier
    )
    message = decode_message(raw)
    assert message.trace == carrier
    assert message.request == payload()  # the argument is untouched
    context = tracing.extract(message.trace)
    parent = trace.get_current_span(context).get_span_context()
    assert parent.trace_id == producer.get_span_context().trace_id
    assert parent.span_id == producer.get_span_context().span_id


def test_tracestate_travels_too(spans: InMemorySpanExporter) -> None:
    carrier = {
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "tracestate": "vendor=opaque",
    }
    raw = celery_message("t", [payload()], queue="q", trace=carrier)
    decoded = decode_message(raw)
    assert decoded.trace == carrier
    assert tracing.inject(tracing.extract(decoded.trace)) == carrier


# -- the worker's spans -------------------------------------------------------------------------


def test_consumer_and_forward_spans_hang_under_the_producer(spans: InMemorySpanExporter) -> None:
    with tracing.publish_span("embeddings.live", "req-1"):
        carrier = tracing.inject()
    assert carrier is not None
    request = payload()
    consumer = tracing.consume(request, carrier, "embeddings.live")
    meta = JobMeta.of(request)
    assert meta.trace is request[tracing.TRACE_KEY]
    assert hash(meta) == hash(JobMeta("req-1", None, 1.0))  # the context is no part of it
    tracing.forward_spans([meta.trace, None], 0.25, 2, model="m")
    tracing.finish(consumer, "ok")
    got = by_name(spans)
    produced, consumed, forward = (
        got["embeddings.live publish"],
        got["embeddings.live process"],
        got["forward"],
    )
    assert consumed.kind == trace.SpanKind.CONSUMER
    assert consumed.parent is not None and produced.context is not None
    assert consumed.parent.span_id == produced.context.span_id
    assert forward.parent is not None and consumed.context is not None
    assert forward.parent.span_id == consumed.context.span_id
    assert forward.end_time is not None and forward.start_time is not None
    assert forward.end_time - forward.start_time == pytest.approx(0.25e9, abs=1e6)
    assert forward.attributes is not None and forward.attributes["laneway.batch_size"] == 2
    assert len(spans.get_finished_spans()) == 3  # no span for the untraced job


def test_a_batch_lines_span_is_found_by_its_request_id(spans: InMemorySpanExporter) -> None:
    assert tracing.TRACER is not None
    with tracing.span("batch chunk"), tracing.LineSpans(["b-1", "b-2"], "batch_x") as lines:
        first, second = JobMeta.line("b-1"), JobMeta.line("b-2")
        tracing.forward_spans([first.trace, second.trace], 0.01, 2, model="m")
        lines.outcomes([200, 400])
    assert tracing.line_context("b-1") is None  # only while the chunk runs
    finished = spans.get_finished_spans()
    chunk = next(s for s in finished if s.name == "batch chunk")
    lines_ = {s.attributes["laneway.request_id"]: s for s in finished if s.name == "batch line"}  # type: ignore[index]
    assert chunk.context is not None
    assert {s.parent.span_id for s in lines_.values() if s.parent} == {chunk.context.span_id}
    assert lines_["b-1"].status.status_code.name != "ERROR"
    assert lines_["b-2"].status.status_code.name == "ERROR"
    forwards = [s for s in finished if s.name == "forward"]
    line_ids = {s.context.span_id for s in lines_.values() if s.context}
    assert {s.parent.span_id for s in forwards if s.parent} == line_ids


def test_off_the_hot_paths_make_nothing() -> None:
    assert tracing.TRACER is None
    assert JobMeta.line("b-1").trace is None
    assert tracing.line_context("b-1") is None
    with tracing.maybe("batch chunk", {"traceparent": "00-bad"}):
        pass  # no tracer needed
