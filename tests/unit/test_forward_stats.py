"""The numbers every engine reports to /metrics (workers.jobs.ForwardStats), and how
the API renders them (api.metrics.WorkerStatsCollector)."""

from __future__ import annotations

import json
import time

from prometheus_client import CollectorRegistry, generate_latest

from api.metrics import WorkerStatsCollector
from workers.jobs import BATCH_SIZE_BUCKETS, ForwardStats, Histogram


def test_histogram_is_cumulative_with_a_sum() -> None:
    h = Histogram((1.0, 2.0, 5.0))
    for v in (0.5, 1.5, 1.7, 9.0):
        h.observe(v)
    assert h.snapshot() == {"buckets": {"1.0": 1, "2.0": 3, "5.0": 3}, "sum": 12.7, "count": 4}


def test_forward_stats_snapshot_keeps_the_old_keys_and_adds_times() -> None:
    stats = ForwardStats()
    stats.record(3, 0.02)
    stats.record(8, 0.2)
    stats.waited("live", time.time() - 0.5, time.monotonic())
    stats.waited("batch", None, time.monotonic() - 2.0)
    snap = stats.snapshot()
    assert (snap["forwards"], snap["items"]) == (2, 11)
    assert snap["batch_size_buckets"]["4"] == 1 and snap["batch_size_buckets"]["8"] == 2
    assert set(snap["batch_size_buckets"]) == {str(b) for b in BATCH_SIZE_BUCKETS}
    assert snap["forward_seconds"]["count"] == 2
    assert abs(snap["forward_seconds"]["sum"] - 0.22) < 1e-9
    live, batch = snap["queue_wait_seconds"]["live"], snap["queue_wait_seconds"]["batch"]
    assert live["count"] == 1 and 0.4 < live["sum"] < 5
    assert batch["count"] == 1 and 1.9 < batch["sum"] < 10
    json.dumps(snap)  # it travels through Redis as JSON


def test_the_api_renders_a_workers_snapshot() -> None:
    stats = ForwardStats()
    stats.record(4, 0.03)
    stats.waited("live", time.time() - 0.01, time.monotonic())
    snapshot = {"worker": "w1", "models": {"m": {**stats.snapshot(), "audio_seconds": 3.5}}}
    collector = WorkerStatsCollector()
    collector.update([json.dumps(snapshot).encode()])
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    assert 'laneway_forward_batch_size_count{model="m",worker="w1"} 1.0' in text
    assert 'laneway_forward_seconds_bucket{le="0.05",model="m",worker="w1"} 1.0' in text
    assert 'laneway_queue_wait_seconds_count{lane="live",model="m",worker="w1"} 1.0' in text
    assert 'laneway_audio_seconds_total{model="m",worker="w1"} 3.5' in text
    assert "laneway_completion_tokens_total{" not in text  # not reported: not rendered


def test_an_older_worker_without_times_still_renders() -> None:
    old = {"forwards": 1, "items": 2, "batch_size_buckets": {"1": 0, "2": 1}}
    collector = WorkerStatsCollector()
    collector.update([json.dumps({"worker": "w0", "models": {"m": old}})])
    registry = CollectorRegistry()
    registry.register(collector)
    assert 'laneway_forward_batch_size_sum{model="m",worker="w0"} 2.0' in (
        generate_latest(registry).decode()
    )
