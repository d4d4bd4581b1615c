"""OpenTelemetry traces of one request across processes: the API's HTTP span, the live
queue publish, the worker's consume and the forward pass the request rode in; for a
batch, its chunks and lines (and their forwards) under the request that created it.

Off unless the standard variables ask for it (``exporter_names``): ``OTEL_TRACES_EXPORTER``
naming an exporter other than ``none`` (``otlp``, ``console``), or an OTLP endpoint
(``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) with the
exporter left unset; ``OTEL_SDK_DISABLED=true`` wins over both. Everything else is the
SDK's own reading of its variables: the sampler (``OTEL_TRACES_SAMPLER``), the resource
(``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``), the OTLP/HTTP exporter's endpoint,
headers and timeout, the batch processor's queue and delays.

``TRACER`` is None while tracing is off, and every traced path reads it before doing
anything else: the live path is latency-critical, so off costs one attribute read per
request (no span, no context extraction, no carrier). Read it as ``tracing.TRACER``,
never ``from configs.tracing import TRACER``: ``install`` rebinds it.

The context crosses processes as W3C ``traceparent``/``tracestate``: in a live task
message's headers (``tasks/queue/publish.py``) and, for batch work, which the database
drives rather than a message, on the batch's row (``BatchRow.trace_context``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar, Token
from types import TracebackType
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger(__name__)

TRACER: Tracer | None = None  # None: tracing is off
_PROVIDER: trace.TracerProvider | None = None  # what TRACER came from (kept alive)
SCOPE = "laneway"
# where the live consumer leaves a request's trace context (its consumer span) in the
# request dict it hands to the capability's handler (``workers.jobs.JobMeta.of``)
TRACE_KEY = "_trace"
# the W3C headers a carrier holds (a task message's headers, a batch row's column)
HEADERS = ("traceparent", "tracestate")
Carrier = dict[str, str]

_PROPAGATOR = TraceContextTextMapPropagator()
# the spans of the batch lines this thread is computing, by request id (``LineSpans``)
_LINES: ContextVar[Mapping[str, Context] | None] = ContextVar("laneway_trace_lines", default=None)


# -- on or off ----------------------------------------------------------------------------------


def exporter_names(env: Mapping[str, str] | None = None) -> list[str]:
    """The exporters the environment asks for; empty: tracing stays off. Unlike the SDK's
    own default (``otlp``), an unset ``OTEL_TRACES_EXPORTER`` means off, unless an OTLP
    endpoint is set: a deployment that never heard of tracing must not try to export."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    asked = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if asked:
        names = [n.strip() for n in asked.split(",")]
        return [n for n in dict.fromkeys(names) if n and n != "none"]
    endpoints = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    return ["otlp"] if any(env.get(name, "").strip() for name in endpoints) else []


def _exporter(name: str) -> SpanExporter | None:
    """One exporter by its ``OTEL_TRACES_EXPORTER`` name (None: unknown, with a warning)."""
    if name == "otlp":
        protocol = os.environ.get(
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "")
        )
        if protocol and protocol != "http/protobuf":
            log.warning("OTLP protocol %r is not installed; exporting with http/protobuf", protocol)
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()  # endpoint, headers, timeout: its own OTEL_EXPORTER_OTLP_*
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    log.warning("unknown OTEL_TRACES_EXPORTER %r: ignored (otlp, console or none)", name)
    return None


def make_provider(service: str, env: Mapping[str, str] | None = None) -> TracerProvider | None:
    """A tracer provider exporting where the environment says, or None when tracing is
    off. ``service`` names the process unless ``OTEL_SERVICE_NAME`` (or ``service.name``
    in ``OTEL_RESOURCE_ATTRIBUTES``) does; the SDK reads the sampler from
    ``OTEL_TRACES_SAMPLER``/``OTEL_TRACES_SAMPLER_ARG``."""
    exporters = [e for n in exporter_names(env) if (e := _exporter(n)) is not None]
    if not exporters:
        return None
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service}))
    provider = TracerProvider(resource=resource)
    for exporter in exporters:  # off the request's thread: export never adds latency
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def setup(service: str) -> bool:
    """Turn tracing on for this process when the environment asks for it (the API and
    each worker call it once at start); whether it is on.

    The provider is laneway's alone, not the global one: FastAPI (0.16x) traces every
    request by itself once a global provider is configured, which would wrap the gate's
    server span in a second one and add spans per dependency on the hot path. (The SDK
    still flushes it at exit.)"""
    if TRACER is not None:
        return True
    provider = make_provider(service)
    if provider is None:
        return False
    install(provider)
    log.info("tracing on: service %s", provider.resource.attributes.get("service.name"))
    return True


def install(provider: trace.TracerProvider | None) -> None:
    """Trace through ``provider`` from now on (None: off). Tests install an SDK provider
    with an in-memory exporter here (a global provider could be set only once)."""
    global TRACER, _PROVIDER
    _PROVIDER = provider
    TRACER = provider.get_tracer(SCOPE) if provider is not None else None


# -- propagation --------------------------------------------------------------------------------


def inject(context: Context | None = None) -> Carrier | None:
    """The W3C headers of ``context`` (default: the current one); None when it holds no
    valid span (tracing off, or no span started)."""
    if TRACER is None:
        return None
    carrier: Carrier = {}
    _PROPAGATOR.inject(carrier, context=context)
    return carrier or None


def extract(carrier: Mapping[str, str] | None) -> Context | None:
    """The context ``carrier`` holds (None: no carrier, a span started under it is a root)."""
    if not carrier:
        return None
    return _PROPAGATOR.extract(carrier)


def carrier_of(headers: Mapping[str, Any]) -> Carrier | None:
    """The W3C headers among ``headers`` (a task message's), as strings; None when absent."""
    found = {k: str(headers[k]) for k in HEADERS if headers.get(k)}
    return found or None


def _tracer() -> Tracer:
    if TRACER is None:  # callers check TRACER first: reaching here is a bug
        raise RuntimeError("tracing is off")
    return TRACER


def span(
    name: str,
    *,
    parent: Mapping[str, str] | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
) -> AbstractContextManager[Span]:
    """A span made current for a ``with`` block, a child of the current span or, with
    ``parent`` (a carrier), of the context it holds. Only when ``TRACER`` is set."""
    context = extract(parent) if parent is not None else None
    return _tracer().start_as_current_span(
        name, context=context, kind=kind, attributes=_clean(attributes)
    )


def _clean(attributes: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``attributes`` less the None values (OpenTelemetry refuses them)."""
    if not attributes:
        return None
    return {k: v for k, v in attributes.items() if v is not None}


# -- the API ------------------------------------------------------------------------------------


def server_span(
    method: str, path: str, headers: Mapping[bytes, bytes], request_id: str
) -> AbstractContextManager[Span]:
    """The span of one HTTP request (``with``), a child of the caller's ``traceparent``
    when it sent one. Named by its route once routed (``http_done``)."""
    carrier = {
        key: headers[key.encode()].decode("latin-1") for key in HEADERS if key.encode() in headers
    }
    return span(
        method,
        parent=carrier or None,
        kind=SpanKind.SERVER,
        attributes={
            "http.request.method": method,
            "url.path": path,
            "laneway.request_id": request_id,
        },
    )


def http_done(span_: Span, method: str, route: str, status: int) -> None:
    """Name the request's span after the route it reached, with the status it got."""
    span_.update_name(f"{method} {route}")
    span_.set_attribute("http.route", route)
    span_.set_attribute("http.response.status_code", status)
    if status >= 500:
        span_.set_status(Status(StatusCode.ERROR))


def publish_span(queue: str, request_id: str) -> AbstractContextManager[Span]:
    """The producer span around one live message's push (``with``): inject inside it, so
    the message carries it as the parent of the worker's consumer span."""
    return span(
        f"{queue} publish",
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.system": "redis",
            "messaging.operation.type": "send",
            "messaging.destination.name": queue,
            "laneway.request_id": request_id,
        },
    )


# -- workers: live requests ---------------------------------------------------------------------


def consume(request: dict[str, Any], carrier: Mapping[str, str], queue: str) -> Span:
    """Start the consumer span of a live request taken off ``queue`` (a child of the
    API's producer span) and leave its context in ``request`` (``TRACE_KEY``) for the
    engine's forward spans. End it with ``finish`` once the reply is written."""
    span_ = _tracer().start_span(
        f"{queue} process",
        context=extract(carrier),
        kind=SpanKind.CONSUMER,
        attributes=_clean(
            {
                "messaging.system": "redis",
                "messaging.operation.type": "process",
                "messaging.destination.name": queue,
                "laneway.request_id": request.get("request_id") or request.get("id"),
                "laneway.model": request.get("model"),
            }
        ),
    )
    request[TRACE_KEY] = trace.set_span_in_context(span_)
    return span_


def finish(span_: Span, outcome: str) -> None:
    """End a consumer span with the request's outcome (``ok``, ``dropped``, a status)."""
    span_.set_attribute("laneway.outcome", outcome)
    if outcome != "ok":
        span_.set_status(Status(StatusCode.ERROR, outcome))
    span_.end()


def forward_spans(
    parents: Sequence[Context | None],
    seconds: float,
    size: int,
    *,
    model: str,
    name: str = "forward",
) -> None:
    """One span per request a forward pass computed (under each one's ``parents``
    context, None: untraced), timed as the forward that just ended after ``seconds``:
    engines batch many requests into one forward, so each gets its own child with the
    same start and end. Call only when ``TRACER`` is set."""
    tracer = _tracer()
    end = time.time_ns()
    start = end - int(seconds * 1e9)
    attributes: dict[str, Any] = {"laneway.batch_size": size, "laneway.model": model}
    for parent in parents:
        if parent is not None:
            tracer.start_span(name, context=parent, start_time=start, attributes=attributes).end(
                end_time=end
            )


# -- workers: batch lines -----------------------------------------------------------------------


def line_context(request_id: str) -> Context | None:
    """The trace context of batch line ``request_id`` while this thread computes it
    (``LineSpans``); None when tracing is off or the line is not traced."""
    if TRACER is None:
        return None
    lines = _LINES.get()
    return lines.get(request_id) if lines else None


class LineSpans:
    """One span per batch line for a ``with`` block, children of the current span (the
    chunk's), that the capability's executor finds by request id (``line_context``)
    while it runs on this thread: an executor takes a whole chunk's lines at once, so
    its signature stays the same whether tracing is on or off."""

    def __init__(self, request_ids: Sequence[str], batch_id: str) -> None:
        tracer = _tracer()
        self.spans = {
            rid: tracer.start_span(
                "batch line", attributes={"laneway.request_id": rid, "laneway.batch_id": batch_id}
            )
            for rid in request_ids
        }
        self._token: Token[Mapping[str, Context] | None] | None = None

    def __enter__(self) -> LineSpans:
        contexts = {rid: trace.set_span_in_context(s) for rid, s in self.spans.items()}
        self._token = _LINES.set(contexts)
        return self

    def outcomes(self, status_codes: Sequence[int]) -> None:
        """Each line's outcome (its response's status), in request order."""
        for span_, code in zip(self.spans.values(), status_codes, strict=False):
            span_.set_attribute("http.response.status_code", code)
            if code != 200:
                span_.set_status(Status(StatusCode.ERROR))

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, _: TracebackType | None
    ) -> None:
        if self._token is not None:
            _LINES.reset(self._token)
        for span_ in self.spans.values():
            if exc is not None:
                span_.record_exception(exc)
                span_.set_status(Status(StatusCode.ERROR, str(exc)))
            span_.end()


@contextmanager
def maybe(
    name: str, parent: Mapping[str, str] | None, attributes: Mapping[str, Any] | None = None
) -> Iterator[None]:
    """A ``with`` block in a span (a child of ``parent``, a carrier) when tracing is on,
    in nothing when off: for batch work, where a generator per job costs nothing beside
    its database round trips."""
    if TRACER is None:
        yield
        return
    with span(name, parent=parent, attributes=attributes):
        yield
