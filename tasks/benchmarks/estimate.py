"""Estimates from measured speed: pure arithmetic over records, no database.

An estimate goes by one ``Rate``: the best row (the highest requests/s, which a batch's
full lanes reach) of the model's latest ``laneway benchmark`` run, else its rolling
records (what its workers measured of their own forwards; one worker's rate each, so
scaled by the workers serving it now). A line costs ``1 / requests_per_s``, scaled by how
its size compares to the record's requests' (tokens in, tokens out: whichever the
record's unit counts).

A running batch's completion time blends that prior with the batch's own pace (lines
done over seconds in progress), its own pace weighing more as it progresses and alone
from ``OWN_PACE_FROM`` of its lines on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from tasks.benchmarks.records import BENCHMARK, ROLLING
from tasks.store.models import BenchmarkRow

# the share of a batch's lines done from which its own pace alone predicts the rest
OWN_PACE_FROM = 0.1
# what a unit's amount per line is called among an estimate's inputs
INPUT_UNITS = {"tokens": "input_tokens", "completion_tokens": "output_tokens"}


@dataclass(frozen=True)
class Rate:
    """How fast one model goes, from one record (or the mean of its rolling rows)."""

    source: str  # benchmark | rolling
    requests_per_s: float | None
    units_per_s: float | None
    unit: str | None
    measured_at: int
    record_ids: tuple[int, ...]

    @property
    def units_per_request(self) -> float | None:
        if self.units_per_s and self.requests_per_s:
            return self.units_per_s / self.requests_per_s
        return None

    def line_seconds(
        self, *, input_tokens: float | None, output_tokens: float | None
    ) -> float | None:
        """Seconds of the model's time one line of this size takes; None when the record
        holds no rate that fits (a rate of seconds of audio, for lines of unknown length)."""
        per_line = {"input_tokens": input_tokens, "output_tokens": output_tokens}.get(
            INPUT_UNITS.get(self.unit or "", "")
        )
        if per_line is not None and self.units_per_s:
            return per_line / self.units_per_s
        if self.requests_per_s:
            return 1.0 / self.requests_per_s
        return None


def choose(rows: Sequence[BenchmarkRow], *, workers: int | None = None) -> Rate | None:
    """The rate estimates go by, from a model's rows (``records.for_models``): its latest
    benchmark run's best row, else its rolling rows' mean times ``workers`` (the workers
    serving it now; at least one)."""
    runs = [r for r in rows if r.source == BENCHMARK and _usable(r)]
    if runs:
        best = max(runs, key=lambda r: (r.requests_per_s or 0.0, r.units_per_s or 0.0))
        scale = max(workers or best.workers, 1) / max(best.workers, 1)
        return _rate(BENCHMARK, [best], scale)
    rolling = [r for r in rows if r.source == ROLLING and _usable(r)]
    if rolling:
        return _rate(ROLLING, rolling, float(max(workers or 1, 1)))
    return None


def _usable(row: BenchmarkRow) -> bool:
    """A row with a rate to go by: a positive, finite one (and not a run that failed)."""
    return (_positive(row.requests_per_s) or _positive(row.units_per_s)) and (
        row.success_rate is None or row.success_rate > 0
    )


def _positive(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value > 0


def _rate(source: str, rows: Sequence[BenchmarkRow], scale: float) -> Rate:
    units = {r.unit for r in rows if r.units_per_s}
    unit = units.pop() if len(units) == 1 else None
    return Rate(
        source=source,
        requests_per_s=_mean([r.requests_per_s for r in rows], scale),
        units_per_s=_mean([r.units_per_s for r in rows], scale) if unit else None,
        unit=unit,
        measured_at=max(r.updated_at for r in rows),
        record_ids=tuple(r.id for r in rows),
    )


def _mean(values: Sequence[float | None], scale: float) -> float | None:
    known = [v for v in values if v is not None and _positive(v)]
    return sum(known) / len(known) * scale if known else None


def seconds_for(
    rate: Rate | None,
    lines: int,
    *,
    input_tokens: float | None = None,
    output_tokens: float | None = None,
) -> float | None:
    """Seconds the model takes for ``lines`` lines of this mean size (None: unknown)."""
    if rate is None:
        return None
    each = rate.line_seconds(input_tokens=input_tokens, output_tokens=output_tokens)
    return None if each is None else lines * each


@dataclass(frozen=True)
class Progress:
    """What a batch object says of how far it got."""

    status: str
    total: int
    done: int  # completed and failed lines
    in_progress_at: int | None


def completion_at(
    progress: Progress, *, now: float, prior_s: float | None, ahead_s: float = 0.0
) -> int | None:
    """When the batch should be done (unix seconds), or None when it is not running or
    nothing is known of its pace. ``prior_s``: what its remaining lines take by the
    model's rate; ``ahead_s``: the work queued ahead of it, which counts until it has
    lines done (from then its own pace holds what it shares the model with)."""
    if progress.status not in ("validating", "in_progress"):
        return None
    remaining = max(progress.total - progress.done, 0)
    if progress.status == "in_progress" and progress.done > 0 and progress.in_progress_at:
        elapsed = max(now - progress.in_progress_at, 1e-3)
        own_s = remaining * elapsed / progress.done
        if prior_s is None:
            return _at(now + own_s)
        share = progress.done / progress.total if progress.total else 1.0
        weight = min(share / OWN_PACE_FROM, 1.0)
        return _at(now + weight * own_s + (1.0 - weight) * prior_s)
    if prior_s is None:
        return None
    return _at(now + prior_s + ahead_s)


def _at(when: float) -> int | None:
    """A time to answer: a record's rate is data, and data may be odd (a zero, a NaN)."""
    return round(when) if math.isfinite(when) else None
