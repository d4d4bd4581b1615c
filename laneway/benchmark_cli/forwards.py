"""The batch size of a step: requests per forward pass, from the stack's ``/metrics``.

Workers publish their forward histograms with each heartbeat (every
``LANEWAY_HEARTBEAT_S``, 2 s by default), so ``/metrics`` lags the forwards by up to one
heartbeat. Reading it right after a step may miss the step's last forwards: ``settled``
waits until every worker's numbers have moved since the step ended (a heartbeat after
the last forward carries them all), at most ``SETTLE_S``.
"""

from __future__ import annotations

import asyncio
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

FAMILY = "laneway_forward_batch_size"
# a little over the default heartbeat
SETTLE_S = 2.5
POLL_S = 0.25

# per worker: (sum of batch sizes, number of forwards)
Totals = dict[str, tuple[float, float]]


def parse_totals(text: str, model: str) -> Totals:
    """``model``'s forward totals per worker in a Prometheus exposition."""
    totals: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != FAMILY:
            continue
        for sample in family.samples:
            if sample.labels.get("model") != model:
                continue
            worker = sample.labels.get("worker", "")
            pair = totals.setdefault(worker, [0.0, 0.0])
            if sample.name == f"{FAMILY}_sum":
                pair[0] = sample.value
            elif sample.name == f"{FAMILY}_count":
                pair[1] = sample.value
    return {w: (s, c) for w, (s, c) in totals.items()}


async def read_totals(client: httpx.AsyncClient, model: str) -> Totals | None:
    """The totals now (None: ``/metrics`` does not answer, e.g. guarded by another key)."""
    try:
        response = await client.get("/metrics")
        if response.status_code != 200:
            return None
        return parse_totals(response.text, model)
    except (httpx.HTTPError, ValueError):
        return None


async def settled(
    client: httpx.AsyncClient, model: str, settle_s: float | None = None
) -> Totals | None:
    """The totals once every worker has published since now (at most ``settle_s``,
    default ``SETTLE_S``)."""
    first = await read_totals(client, model)
    if first is None:
        return None
    latest = first
    deadline = time.monotonic() + (SETTLE_S if settle_s is None else settle_s)
    while time.monotonic() < deadline:
        await asyncio.sleep(POLL_S)
        latest = await read_totals(client, model) or latest
        if first and all(latest.get(w) != v for w, v in first.items()):
            break
    return latest


def batch_size(before: Totals | None, after: Totals | None) -> float | None:
    """Mean requests per forward pass between two readings (None: none ran, or unknown).
    A worker whose counters went back (it restarted) counts from zero."""
    if before is None or after is None:
        return None
    size = forwards = 0.0
    for worker, (total, count) in after.items():
        was_total, was_count = before.get(worker, (0.0, 0.0))
        if count < was_count or total < was_total:
            was_total, was_count = 0.0, 0.0
        size += total - was_total
        forwards += count - was_count
    return size / forwards if forwards > 0 else None
