"""One run: probe the model, warm it up, then one step per concurrency, each measured
into a record.

The requests come from the capability's contract hook (``bench_request``, read through
the registry), so this module serves every capability without naming one.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import httpx

from configs.capabilities import REGISTRY
from laneway.benchmark_cli import forwards
from laneway.benchmark_cli.load import MakeRequest, Step, run_step, send
from laneway.benchmark_cli.probe import EXIT_FAILED, EXIT_USAGE, BenchmarkError, Target, probe
from laneway.benchmark_cli.stats import first_error, summarize
from tasks.benchmarks.records import Measured
from tasks.contracts.base import BenchRequest

DEFAULT_INPUT_TOKENS = 128
DEFAULT_OUTPUT_TOKENS = 64
# per step without --requests or --duration: enough for a p95 at every concurrency
MIN_REQUESTS, REQUESTS_PER_CLIENT = 32, 8
CLIP = "benchmark_clip.wav"  # in laneway/assets


@dataclass(frozen=True)
class Plan:
    """What a run sends: the sweep and the size of every request."""

    model: str
    concurrency: tuple[int, ...]
    requests: int | None  # per step; None with a duration
    duration_s: float | None
    input_tokens: int | None  # None: the default, fitted to the model's context
    output_tokens: int
    clip: Path | None  # None: the packaged clip
    timeout_s: float  # for a warm worker


@dataclass(frozen=True)
class Run:
    """A measured run: its target and a record per step."""

    target: Target
    rows: list[Measured]


def requests_per_step(plan: Plan, concurrency: int) -> int | None:
    """``--requests``, none with ``--duration``, else enough for several per client."""
    if plan.requests is not None or plan.duration_s is not None:
        return plan.requests
    return max(MIN_REQUESTS, REQUESTS_PER_CLIENT * concurrency)


def fitted_input_tokens(plan: Plan, context: int | None) -> int:
    """``--input-tokens``, else the default, at most half the model's context (the other
    half leaves room for what a generative model writes)."""
    if plan.input_tokens is not None:
        return plan.input_tokens
    return min(DEFAULT_INPUT_TOKENS, max(1, context // 2)) if context else DEFAULT_INPUT_TOKENS


def clip_bytes(path: Path | None) -> bytes:
    """``--clip``, else the packaged clip (what speech models transcribe)."""
    if path is None:
        return (resources.files("laneway") / "assets" / CLIP).read_bytes()
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BenchmarkError(f"cannot read --clip {path}: {exc}", EXIT_USAGE) from None


def request_maker(plan: Plan, target: Target, input_tokens: int) -> MakeRequest:
    """The capability's ``bench_request`` hook, bound to this run's lengths and clip."""
    capability = REGISTRY.get(target.capability)
    if capability is None:
        raise BenchmarkError(
            f"{target.model!r} is a {target.capability!r} model: a capability this laneway "
            "does not know how to benchmark",
            EXIT_USAGE,
        )
    hook: Callable[..., BenchRequest] = capability.contract_module().bench_request
    clip = clip_bytes(plan.clip)

    def make(seq: int) -> BenchRequest:
        return hook(
            target.model,
            input_tokens=input_tokens,
            output_tokens=plan.output_tokens,
            clip=clip,
            seq=seq,
        )

    return make


async def warm_up(client: httpx.AsyncClient, make: MakeRequest, seq: int) -> None:
    """One request before the sweep (the first forwards may compile or allocate); its
    failure is the run's: nothing after it would succeed."""
    outcome = await send(client, make(seq))
    if not outcome.ok:
        raise BenchmarkError(f"the warm-up request failed: {outcome.error}", EXIT_FAILED)


async def sweep(client: httpx.AsyncClient, plan: Plan, progress: Callable[[Measured], None]) -> Run:
    """Probe, warm up and measure every concurrency of ``plan``."""
    target = await probe(client, plan.model, plan.timeout_s)
    make = request_maker(plan, target, fitted_input_tokens(plan, target.context_length))
    # a random start: a second run's texts are not the first's (caches outlive runs)
    seqs = itertools.count(secrets.randbelow(10**6) * 10**3)
    await warm_up(client, make, next(seqs))
    before = await forwards.settled(client, target.model)
    unit = make(0).unit
    steps: list[Step] = []
    rows: list[Measured] = []
    for concurrency in plan.concurrency:
        step = await run_step(
            client,
            make,
            concurrency=concurrency,
            requests=requests_per_step(plan, concurrency),
            duration_s=plan.duration_s,
            seqs=seqs,
        )
        after = await forwards.settled(client, target.model)
        steps.append(step)
        rows.append(
            summarize(step, target, unit=unit, batch_size=forwards.batch_size(before, after))
        )
        progress(rows[-1])
        before = after
    if not any(o.ok for s in steps for o in s.outcomes):
        raise BenchmarkError(f"every request failed; the first: {first_error(steps)}", EXIT_FAILED)
    return Run(target=target, rows=rows)
