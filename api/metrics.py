"""Prometheus metrics of the API process, plus what workers report through Redis."""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

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
QUEUE_DEPTH = Gauge(
    "laneway_queue_depth", "Messages waiting in each Celery queue", ["queue"], registry=REGISTRY
)
WORKERS = Gauge(
    "laneway_workers", "Live workers per model and warmth", ["model", "warm"], registry=REGISTRY
)


class WorkerStatsCollector(Collector):
    """Forward batch sizes and cache counters as the workers last reported them."""

    def __init__(self) -> None:
        self.snapshots: list[dict[str, Any]] = []

    def update(self, raw: list[bytes | str | None]) -> None:
        self.snapshots = [json.loads(r) for r in raw if r]

    def collect(self) -> Iterator[Any]:
        sizes = HistogramMetricFamily(
            "laneway_forward_batch_size", "Requests per forward pass", labels=["model", "worker"]
        )
        hits = CounterMetricFamily(
            "laneway_embedding_cache_hits", "Embedding cache hits", labels=["model", "worker"]
        )
        misses = CounterMetricFamily(
            "laneway_embedding_cache_misses", "Embedding cache misses", labels=["model", "worker"]
        )
        for snap in self.snapshots:
            worker = snap.get("worker", "?")
            for model, m in snap.get("models", {}).items():
                buckets = [(le, float(n)) for le, n in m["batch_size_buckets"].items()]
                buckets.append(("+Inf", float(m["forwards"])))
                sizes.add_metric([model, worker], buckets, sum_value=float(m["items"]))
                hits.add_metric([model, worker], float(m["cache_hits"]))
                misses.add_metric([model, worker], float(m["cache_misses"]))
        yield sizes
        yield hits
        yield misses


WORKER_STATS = WorkerStatsCollector()
REGISTRY.register(WORKER_STATS)
