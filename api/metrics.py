"""Prometheus metrics of the API processes, plus what workers report through Redis.

Request latency and error counts are the API process's own. With several API processes
(``laneway api --workers N``) they are kept in ``PROMETHEUS_MULTIPROC_DIR`` (set by the
CLI before the processes start) and every process's ``/metrics`` adds them all up. Queue
depths, worker counts and forward statistics are read from Redis at scrape time, so any
process answers them alike.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterator, Mapping
from functools import cache
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from configs import capabilities
from tasks.contracts.base import EngineCounter

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
REGISTRY = CollectorRegistry(auto_describe=True)

# labels taken from a request are bounded: the route's template (never the raw path) and
# a served model id (anything else the client sends counts under one fixed label)
UNMATCHED_ROUTE = "unmatched"
OTHER_MODEL = "other"


def route_label(scope: Mapping[str, Any]) -> str:
    """The matched route's template (``/v1/files/{file_id}``), or ``unmatched``."""
    route = scope.get("route")
    return str(getattr(route, "path", None) or UNMATCHED_ROUTE)


def model_label(model: object, served: Collection[str]) -> str:
    """``model`` when it is served here, else ``other``; empty when the route has none."""
    if model is None or model == "":
        return ""
    return model if isinstance(model, str) and model in served else OTHER_MODEL


REQUEST_LATENCY = Histogram(
    "laneway_request_duration_seconds",
    "Request latency by route and model",
    ["route", "model", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
ERRORS = Counter(
    "laneway_errors_total",
    "Error responses by route and status code",
    ["route", "code"],
    registry=REGISTRY,
)


class BrokerGauges(Collector):
    """Queue depths and workers per model, as last read from Redis (at scrape time)."""

    def __init__(self) -> None:
        self.depths: dict[str, int] = {}
        self.workers: dict[str, tuple[int, int]] = {}  # model -> (warm, not warm)
        self.batches: dict[str, int] = {}  # status -> batches (from the database)

    def collect(self) -> Iterator[Any]:
        depth = GaugeMetricFamily(
            "laneway_queue_depth", "Messages waiting in each Celery queue", labels=["queue"]
        )
        for queue, n in self.depths.items():
            depth.add_metric([queue], float(n))
        workers = GaugeMetricFamily(
            "laneway_workers", "Live workers per model and warmth", labels=["model", "warm"]
        )
        for model, (warm, cold) in self.workers.items():
            workers.add_metric([model, "true"], float(warm))
            workers.add_metric([model, "false"], float(cold))
        batches = GaugeMetricFamily(
            "laneway_batches", "Batch API batches by status", labels=["status"]
        )
        for status, n in self.batches.items():
            batches.add_metric([status], float(n))
        yield depth
        yield workers
        yield batches


class WorkerStatsCollector(Collector):
    """Forward batch sizes and engine counters as the workers last reported them."""

    def __init__(self) -> None:
        self.snapshots: list[dict[str, Any]] = []

    def update(self, raw: list[bytes | str | None]) -> None:
        self.snapshots = [json.loads(r) for r in raw if r]

    def collect(self) -> Iterator[Any]:
        labels = ["model", "worker"]
        sizes = HistogramMetricFamily(
            "laneway_forward_batch_size", "Requests per forward pass", labels=labels
        )
        # a forward pass is what the capability's engine runs at once: a batch of inputs,
        # one decode step of the running sequences, a segment or a batch of clips
        seconds = HistogramMetricFamily(
            "laneway_forward_seconds",
            "Seconds per forward pass (a batch, a decode step, a segment: the engine's)",
            labels=labels,
        )
        waits = HistogramMetricFamily(
            "laneway_queue_wait_seconds",
            "Seconds from the API's send (live) or the engine's intake (batch) to compute",
            labels=[*labels, "lane"],
        )
        counters = {
            key: CounterMetricFamily(name, doc, labels=labels)
            for key, name, doc in engine_counters()
        }
        for snap in self.snapshots:
            worker = snap.get("worker", "?")
            for model, m in snap.get("models", {}).items():
                sizes.add_metric(
                    [model, worker], *_histogram(m["batch_size_buckets"], m["forwards"], m["items"])
                )
                if "forward_seconds" in m:
                    seconds.add_metric([model, worker], *_snapshot(m["forward_seconds"]))
                for lane, hist in (m.get("queue_wait_seconds") or {}).items():
                    waits.add_metric([model, worker, lane], *_snapshot(hist))
                # each capability's engine reports its own counters
                for key, family in counters.items():
                    if key in m:
                        family.add_metric([model, worker], float(m[key]))
        yield from (sizes, seconds, waits, *counters.values())


@cache
def engine_counters() -> tuple[EngineCounter, ...]:
    """The counters engines may report: every registry capability's contract's
    ``ENGINE_COUNTERS``, once per snapshot key (the first capability's wins)."""
    counters: dict[str, EngineCounter] = {}
    for capability in capabilities.REGISTRY.values():
        for counter in capability.contract_module().ENGINE_COUNTERS:
            counters.setdefault(counter.key, counter)
    return tuple(counters.values())


def _histogram(
    buckets: Mapping[str, int], count: float, total: float
) -> tuple[list[tuple[str, float]], float]:
    """A worker's cumulative buckets as prometheus_client takes them (+Inf added)."""
    out = [(le, float(n)) for le, n in buckets.items()]
    out.append(("+Inf", float(count)))
    return out, float(total)


def _snapshot(hist: Mapping[str, Any]) -> tuple[list[tuple[str, float]], float]:
    """``workers.batching.Histogram.snapshot()`` as prometheus_client takes it."""
    return _histogram(hist["buckets"], hist["count"], hist["sum"])


WORKER_STATS = WorkerStatsCollector()
REGISTRY.register(WORKER_STATS)


BROKER = BrokerGauges()
REGISTRY.register(BROKER)
_aggregate: CollectorRegistry | None = None


def exposition() -> bytes:
    """The text /metrics serves: this process's registry, or with several API processes
    their request metrics added up plus the scrape-time collectors."""
    global _aggregate
    if not os.environ.get(MULTIPROC_ENV):
        return generate_latest(REGISTRY)
    if _aggregate is None:
        _aggregate = CollectorRegistry()
        MultiProcessCollector(_aggregate)
        _aggregate.register(WORKER_STATS)
        _aggregate.register(BROKER)
    return generate_latest(_aggregate)
