"""Following a batch: the progress line (done/failed/total, the measured rate, the ETA),
redrawn on a terminal or printed on change, and the polling loop."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from laneway.batch_cli.client import Api, Batch

FINISHED = ("completed", "failed", "expired", "cancelled")
RATE_WINDOW_S = 30.0


def format_duration(seconds: float) -> str:
    """``0:00:16``, ``12:03:00``."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def format_rate(rate: float | None) -> str:
    if rate is None:
        return "-/s"
    return f"{rate:.1f}/s" if rate < 10 else f"{rate:.0f}/s"


def progress_line(batch: Batch, rate: float | None, *, wall: float | None = None) -> str:
    """``batch_abc  in_progress  1200/5000 done  3 failed  240/s  ETA 0:00:16``; done counts
    completed and failed requests alike. The ETA is the server's estimate
    (``estimated_completion_at``, against the wall clock ``wall``) when it sends one,
    else the remaining requests at the measured ``rate``."""
    counts = batch.get("request_counts") or {}
    total = int(counts.get("total") or 0)
    failed = int(counts.get("failed") or 0)
    done = int(counts.get("completed") or 0) + failed
    line = f"{batch['id']}  {batch['status']}  {done}/{total} done  {failed} failed"
    line += f"  {format_rate(rate)}"
    if batch["status"] in FINISHED:
        return line
    estimated = batch.get("estimated_completion_at")
    if isinstance(estimated, int | float) and wall is not None:
        return f"{line}  ETA {format_duration(estimated - wall)}"
    if rate and total > done:
        return f"{line}  ETA {format_duration((total - done) / rate)}"
    return f"{line}  ETA -"


@dataclass
class Progress:
    """Follows a batch's counts: the rate is the measured change of completed + failed
    over the last ``window`` seconds. On a TTY one line is redrawn in place; otherwise a
    line is printed whenever the status or the counts change."""

    out: TextIO
    tty: bool
    window: float = RATE_WINDOW_S
    samples: collections.deque[tuple[float, int]] = field(default_factory=collections.deque)
    last_key: tuple[Any, ...] | None = None
    width: int = 0

    def rate(self, now: float, done: int) -> float | None:
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window:
            self.samples.popleft()
        first_t, first_done = self.samples[0]
        if now - first_t <= 0:
            return None
        return max(0.0, (done - first_done) / (now - first_t))

    def update(self, batch: Batch, now: float, *, wall: float | None = None) -> str:
        """Show ``batch`` as seen at ``now`` (the rate's clock) and ``wall`` (unix seconds:
        the server's ETA is a time of day)."""
        counts = batch.get("request_counts") or {}
        done = int(counts.get("completed") or 0) + int(counts.get("failed") or 0)
        line = progress_line(batch, self.rate(now, done), wall=wall)
        key = (batch["status"], counts.get("completed"), counts.get("failed"), counts.get("total"))
        if self.tty:
            self.out.write("\r" + line.ljust(self.width))
            self.width = max(self.width, len(line))
            self.out.flush()
        elif key != self.last_key:
            self.out.write(line + "\n")
            self.out.flush()
        self.last_key = key
        return line

    def finish(self) -> None:
        if self.tty and self.width:
            self.out.write("\n")
            self.out.flush()
            self.width = 0


def wait(
    api: Api,
    batch_id: str,
    progress: Progress,
    interval: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Batch:
    """Poll the batch every ``interval`` seconds until it is finished."""
    try:
        while True:
            batch = api.retrieve(batch_id)
            progress.update(batch, clock(), wall=time.time())
            if batch["status"] in FINISHED:
                return batch
            sleep(interval)
    finally:
        progress.finish()
