"""Queue, lane and task names: the contract between the API and the workers."""

from __future__ import annotations

from typing import Literal

Lane = Literal["live", "batch"]
LIVE: Lane = "live"
BATCH: Lane = "batch"
LANES: tuple[Lane, ...] = (LIVE, BATCH)


def queue_name(capability: str, lane: Lane) -> str:
    """``embeddings.live``: one Redis list per capability and lane."""
    return f"{capability}.{lane}"


def task_name(capability: str, lane: Lane) -> str:
    return f"laneway.{capability}.{lane}"


# Redis keys shared by the API and the workers (all under one prefix).
PREFIX = "laneway"
WORKERS_KEY = f"{PREFIX}:workers"  # hash: worker id -> readiness JSON
RESULT_CHANNEL_PREFIX = f"{PREFIX}:reply:"  # pub/sub channel per API process


def result_key(request_id: str) -> str:
    """Fallback copy of a live result, read when the pub/sub message was missed."""
    return f"{PREFIX}:result:{request_id}"


def cancelled_key(request_id: str) -> str:
    """Set by the API when the caller went away; workers drop such requests."""
    return f"{PREFIX}:gone:{request_id}"


def worker_metrics_key(worker_id: str) -> str:
    return f"{PREFIX}:wmetrics:{worker_id}"
