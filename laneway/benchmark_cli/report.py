"""What a run prints: a table of its records (one row per concurrency), or JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict

from laneway.benchmark_cli.probe import Target
from tasks.benchmarks.records import Measured


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}ms"


def header(target: Target, rows: Sequence[Measured]) -> str:
    """The line above the table: what was measured, on what, with requests of what size
    (the mean tokens the answers counted, where they count any)."""
    context = target.context_length if target.context_length is not None else "unknown"
    parts = [
        f"{target.model} ({target.capability}) on {target.engine}, device {target.device}, "
        f"{target.workers} warm worker(s), context {context}"
    ]
    for name in ("input_tokens", "output_tokens"):
        means = [m for r in rows if (m := getattr(r, name)) is not None]
        if means:
            parts.append(f"{sum(means) / len(means):.0f} {name.replace('_', ' ')} a request")
    return "; ".join(parts)


def step_line(row: Measured) -> str:
    """A progress line per step (stderr), while the sweep runs."""
    return (
        f"concurrency {row.concurrency}: {row.requests} requests, "
        f"{row.success_rate:.0%} ok, {_num(row.requests_per_s)} req/s"
    )


def table(rows: Sequence[Measured]) -> str:
    """The records as aligned columns."""
    unit = next((r.unit for r in rows if r.unit), "units")
    head = ("CONC", "REQS", "OK", "REQ/S", f"{unit.upper()}/S", "P50", "P95", "TTFT", "BATCH")
    lines = [head]
    for r in rows:
        lines.append(
            (
                str(r.concurrency),
                str(r.requests),
                f"{r.success_rate:.0%}",
                _num(r.requests_per_s),
                _num(r.units_per_s),
                _ms(r.latency_p50_s),
                _ms(r.latency_p95_s),
                _ms(r.ttft_p50_s),
                _num(r.batch_size, 2),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join(
        "  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def as_json(rows: Sequence[Measured], run_id: str | None) -> str:
    """``--json``: the run id (null with ``--no-store``) and the records' fields."""
    return json.dumps({"run_id": run_id, "records": [asdict(r) for r in rows]}, indent=2)
