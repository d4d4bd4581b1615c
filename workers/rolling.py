"""Rolling records: a worker's measured rates, folded into the database now and then, so
that estimates work when no ``laneway benchmark`` has run.

Every ``LANEWAY_ROLLING_EVERY_S`` the heartbeat thread compares each engine's metrics
snapshot (what it reports to ``/metrics`` anyway) with the last one: the items its
forwards took and the seconds they ran, and the capability's unit counter where it has
one (its contract's ``ROLLING`` hook says which). An interval with at least
``MIN_BUSY_S`` seconds of forwards gives one sample per model: items (requests) and units
per second of forward time, which is the engine's rate while it has work. That leaves
out the time between forwards (tokenizing, answering), so it runs ahead of what a client
measures; a benchmark record, where there is one, is preferred (tasks/benchmarks/).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from configs.capabilities import REGISTRY
from tasks.benchmarks.records import Sample, fold_rolling
from tasks.store.db import session_scope

log = logging.getLogger(__name__)

# an interval with fewer seconds of forwards than this says too little to fold
MIN_BUSY_S = 1.0


@dataclass(frozen=True)
class Counts:
    """The cumulative counts of one engine's snapshot that rates are made of."""

    forwards: int
    items: int
    seconds: float
    units: float

    @classmethod
    def of(cls, snapshot: Mapping[str, Any], unit_key: str | None) -> Counts:
        seconds = (snapshot.get("forward_seconds") or {}).get("sum") or 0.0
        units = float(snapshot.get(unit_key) or 0.0) if unit_key else 0.0
        return cls(
            int(snapshot.get("forwards") or 0), int(snapshot.get("items") or 0), seconds, units
        )


class RollingRates:
    """One worker's rates per model, since its last fold."""

    def __init__(self, *, capability: str, device: str) -> None:
        self.capability = capability
        self.device = device
        self.hook = REGISTRY[capability].contract_module().ROLLING
        self._last: dict[str, Counts] = {}

    def samples(
        self, snapshots: Mapping[str, Mapping[str, Any]], engines: Mapping[str, str]
    ) -> list[Sample]:
        """The samples of the models (``snapshots``: each one's ``metrics()``; ``engines``:
        the engine each runs on) whose forwards ran long enough since their last sample
        (the first call only takes note)."""
        out = []
        for model, snapshot in snapshots.items():
            now = Counts.of(snapshot, self.hook.unit_key)
            before = self._last.get(model)
            if before is None or now.seconds < before.seconds:
                self._last[model] = now  # a first look, or the engine's counts began again
                continue
            if now.seconds - before.seconds < MIN_BUSY_S:
                continue  # a quiet interval adds up into the next
            self._last[model] = now
            busy = now.seconds - before.seconds
            forwards = now.forwards - before.forwards
            items = now.items - before.items
            out.append(
                Sample(
                    model=model,
                    capability=self.capability,
                    engine=engines.get(model, "?"),
                    device=self.device,
                    requests_per_s=items / busy if self.hook.requests else None,
                    units_per_s=(now.units - before.units) / busy if self.hook.unit else None,
                    unit=self.hook.unit,
                    batch_size=items / forwards if forwards > 0 else None,
                )
            )
        return out


def fold(samples: list[Sample]) -> None:
    """Fold ``samples`` into their rolling records; a database that cannot take them now
    costs only these samples (the heartbeat goes on)."""
    if not samples:
        return
    try:
        with session_scope() as s:
            for sample in samples:
                fold_rolling(s, sample, now=time.time())
    except Exception as exc:
        log.warning("could not fold rolling rates into the database: %s", exc)
