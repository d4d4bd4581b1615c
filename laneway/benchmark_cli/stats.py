"""From a step's outcomes to a record: percentiles, rates and means.

Latencies and rates count the successful requests only (a failure's latency says how fast
the server refused, not how fast it serves); failures show in the success rate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from laneway.benchmark_cli.load import Step
from laneway.benchmark_cli.probe import Target
from tasks.benchmarks.records import Measured


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) by linear interpolation between the closest ranks
    (NumPy's default), None for no values."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"a percentile is between 0 and 100, not {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def mean(values: Iterable[float | None]) -> float | None:
    """The mean of the values there are (None where none is)."""
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def rate(count: float, seconds: float) -> float:
    """``count`` per second over ``seconds`` (0 for no time: nothing was measured)."""
    return count / seconds if seconds > 0 else 0.0


def summarize(step: Step, target: Target, *, unit: str, batch_size: float | None) -> Measured:
    """One record of the run: ``target`` at ``step``'s concurrency."""
    ok = [o for o in step.outcomes if o.ok]
    latencies = [o.latency_s for o in ok]
    ttfts = [o.ttft_s for o in ok if o.ttft_s is not None]
    units = [o.units for o in ok if o.units is not None]
    total = len(step.outcomes)
    return Measured(
        model=target.model,
        capability=target.capability,
        engine=target.engine,
        device=target.device,
        workers=target.workers,
        concurrency=step.concurrency,
        requests=total,
        success_rate=len(ok) / total if total else 0.0,
        requests_per_s=rate(len(ok), step.wall_s),
        units_per_s=rate(sum(units), step.wall_s) if units else None,
        unit=unit,
        latency_p50_s=percentile(latencies, 50),
        latency_p95_s=percentile(latencies, 95),
        ttft_p50_s=percentile(ttfts, 50),
        batch_size=batch_size,
        context_length=target.context_length,
        input_tokens=mean(o.input_tokens for o in ok),
        output_tokens=mean(o.output_tokens for o in ok),
        sample_response=next((o.text for o in ok if o.text), None),
    )


def first_error(steps: Sequence[Step]) -> str | None:
    """The first failure's message of a run (what to show when every request failed)."""
    for step in steps:
        for outcome in step.outcomes:
            if not outcome.ok:
                return outcome.error or "unknown error"
    return None
