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
# an API process's reply list lives this long after the last reply pushed to it, so the
# list of an API process that died goes away by itself
REPLY_TTL_S = 120


def reply_queue(api_id: str) -> str:
    """The list one API process pops its live replies from (workers push to its right)."""
    return f"{PREFIX}:replies:{api_id}"


def cancelled_key(request_id: str) -> str:
    """Set by the API when the caller went away; workers drop such requests."""
    return f"{PREFIX}:gone:{request_id}"


def worker_metrics_key(worker_id: str) -> str:
    return f"{PREFIX}:wmetrics:{worker_id}"
