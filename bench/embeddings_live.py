"""Live /v1/embeddings overhead, batching and plumbing, against the raw model in the same run.

1. p50 of one short input: the model's own tokenize + forward, in this process, vs the
   API through a lean client (aiohttp, one kept-alive connection, base64, sequential;
   goal: at most 3 ms added) and through the official `openai` client; and the p50 of
   GET /v1/models through both (HTTP + FastAPI with no queue and no model: the floor).
2. throughput: the model at batch 64 (distinct short texts) vs the API with 64 concurrent
   single-input clients sending distinct texts (goal: at least 0.8 of raw), and the mean
   batch size per forward the worker reported on the API's /metrics.
3. plumbing alone, on the weightless `laneway/fake-embeddings` the same worker serves: live
   requests/s at 64 concurrent clients vs GET /v1/models requests/s on the same API (goal:
   at least 0.5), and the CPU milliseconds each live request cost the API, the worker and
   redis-server, each with its child processes (goal: under 1 ms each).
4. Redis memory growth per 10,000 fake live requests once all are answered (goal: under
   1 MB), and the number of laneway:* keys before and after.

The model is measured before the stack starts and again after it has stopped (it stays
loaded but idle in between, so it never competes with the API for the CPUs); the two raw
runs show how steady the machine was. CPU time used by processes other than the bench's
own is reported too: anything else running on the machine makes the numbers meaningless.

    .venv/bin/python bench/embeddings_live.py [--requests 200] [--concurrency 64]
        [--seconds 15] [--plumbing-requests 10000] [--api-workers 1]
    ./dev bench embeddings_live [same options]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).parent))

from _stack import (
    FAKE_MODEL,
    MODEL,
    BenchStack,
    CpuMeter,
    Goal,
    Load,
    MakeRequest,
    RedisMemory,
    Request,
    cpu_by_role,
    load_backend,
    print_summary,
    redis_memory,
    run_load,
    sequential_p50,
)
from openai import OpenAI

TEXT = "The quick brown fox jumps over the lazy dog"
MODELS: Request = ("GET", "/v1/models", None)
T = TypeVar("T")


def step(text: str) -> None:
    """A progress line, shown at once."""
    print(text, flush=True)


def distinct(i: int) -> str:
    return f"{TEXT} number {i}"


def embed(model: str, text: str, path: str = "/v1/embeddings") -> Request:
    """One single-input POST of an embeddings request, base64 as the official client asks."""
    body = {"model": model, "input": text, "encoding_format": "base64"}
    return ("POST", path, body)


def distinct_embeds(model: str, path: str = "/v1/embeddings") -> MakeRequest:
    """Client k's i-th request: a text no other request sends (no cache could help)."""
    return lambda k, i: embed(model, distinct(k * 1_000_000 + i), path)


@dataclass
class Peer:
    """Another server of the same weights, measured with the same lean client."""

    url: str
    p50_s: float
    load: Load


def measure_peer(args: argparse.Namespace) -> Peer | None:
    """The peer at ``--peer-url`` (started by hand, e.g. infinity-emb as in PEERS.md), with
    the same one short input and the same 64 concurrent clients; None without one."""
    if not args.peer_url:
        return None
    step(f"peer: {args.peer_url} (model {args.peer_model}) ...")
    request = embed(args.peer_model, TEXT, args.peer_path)
    p50 = sequential_p50(args.peer_url, request, args.requests)
    make = distinct_embeds(args.peer_model, args.peer_path)
    load = run_load(args.peer_url, make, args.concurrency, seconds=args.seconds)
    return Peer(args.peer_url, p50, load)


def report_peer(before: Raw, after: Raw, peer: Peer, concurrency: int) -> None:
    raw_p50 = statistics.mean([before.p50_s, after.p50_s])
    raw_rate = statistics.mean([before.rate, after.rate])
    print(
        f"peer {peer.url}, same lean client: p50 {ms(peer.p50_s)}, added "
        f"{ms(peer.p50_s - raw_p50)}; {concurrency} concurrent clients "
        f"{peer.load.rate:.0f} inputs/s, ratio {peer.load.rate / raw_rate:.2f} to the model"
        f"{errors_note(peer.load)}"
    )


@dataclass
class Raw:
    p50_s: float
    rate: float  # inputs/s at batch `concurrency`


def measure_raw(backend: object, requests: int, concurrency: int) -> Raw:
    """Tokenize + one forward, as the worker does, without any of the serving path."""
    tokenize = backend.tokenize  # type: ignore[attr-defined]
    forward = backend.forward  # type: ignore[attr-defined]
    for _ in range(20):
        forward(tokenize([TEXT]))
    samples = []
    for _ in range(requests):
        t0 = time.perf_counter()
        forward(tokenize([TEXT]))
        samples.append(time.perf_counter() - t0)
    texts = [distinct(i) for i in range(concurrency)]
    forward(tokenize(texts))
    rounds, t0 = 0, time.perf_counter()
    while rounds < 5 or time.perf_counter() - t0 < 5:
        forward(tokenize(texts))
        rounds += 1
    rate = rounds * concurrency / (time.perf_counter() - t0)
    return Raw(statistics.median(samples), rate)


def client_p50(call: Callable[[], object], requests: int) -> float:
    """p50 of ``call`` made sequentially through the official client, after 20 warm-ups."""
    for _ in range(20):
        call()
    samples = []
    for _ in range(requests):
        t0 = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


@dataclass
class Latency:
    lean_s: float
    lean_floor_s: float
    official_s: float
    official_floor_s: float


def measure_latency(stack: BenchStack, requests: int) -> Latency:
    lean = sequential_p50(stack.base, embed(MODEL, TEXT), requests)
    lean_floor = sequential_p50(stack.base, MODELS, requests)
    client = OpenAI(base_url=f"{stack.base}/v1", api_key="bench", max_retries=0)
    try:
        # base64, the client's default; GET /v1/models is the floor: HTTP, uvicorn, FastAPI
        # and the client's own cost, with no queue and no model
        official = client_p50(lambda: client.embeddings.create(model=MODEL, input=TEXT), requests)
        return Latency(lean, lean_floor, official, client_p50(client.models.list, requests))
    finally:
        client.close()


@dataclass
class Batching:
    load: Load
    items: float
    forwards: float

    @property
    def mean(self) -> float:
        return self.items / self.forwards if self.forwards else float("nan")


def measure_batching(stack: BenchStack, concurrency: int, seconds: float) -> Batching:
    """MiniLM under load; the forward counters sum over every model, but only MiniLM has
    had traffic yet (the fake backend's phases come later)."""
    time.sleep(3)  # let the worker publish its counters (every ~2 s)
    forwards0 = stack.metric("laneway_forward_batch_size_count")
    items0 = stack.metric("laneway_forward_batch_size_sum")
    load = run_load(stack.base, distinct_embeds(MODEL), concurrency, seconds=seconds)
    time.sleep(3)
    forwards = stack.metric("laneway_forward_batch_size_count") - forwards0
    items = stack.metric("laneway_forward_batch_size_sum") - items0
    return Batching(load, items, forwards)


def cpu_per_request(
    stack: BenchStack, make: MakeRequest, concurrency: int, seconds: float
) -> tuple[Load, dict[str, float]]:
    """A load run, and the CPU ms per request (every request it sent, ramp-up included)
    each role's process tree used over the whole run, this process as "bench"."""
    before = cpu_by_role(stack.roles())
    load = run_load(stack.base, make, concurrency, seconds=seconds)
    after = cpu_by_role(stack.roles())
    per = max(load.requests, 1)
    return load, {name: (after[name] - before[name]) * 1e3 / per for name in after}


@dataclass
class Plumbing:
    live: Load
    live_cpu_ms: dict[str, float]
    models: Load
    models_cpu_ms: dict[str, float]


def measure_plumbing(stack: BenchStack, concurrency: int, seconds: float) -> Plumbing:
    live, live_cpu = cpu_per_request(stack, distinct_embeds(FAKE_MODEL), concurrency, seconds)
    models, models_cpu = cpu_per_request(stack, lambda k, i: MODELS, concurrency, seconds)
    return Plumbing(live, live_cpu, models, models_cpu)


@dataclass
class Memory:
    load: Load
    before: RedisMemory
    answered: RedisMemory  # right after the last reply arrived
    settled: RedisMemory  # 1 s later

    @property
    def growth_mb_per_10k(self) -> float:
        growth = self.settled.used_bytes - self.before.used_bytes
        return growth / 1e6 * 10_000 / max(self.load.requests, 1)


def measure_memory(stack: BenchStack, concurrency: int, total: int) -> Memory:
    url = stack.env["LANEWAY_REDIS_URL"]
    time.sleep(1)  # the earlier runs' last replies delivered
    before = redis_memory(url)
    load = run_load(stack.base, distinct_embeds(FAKE_MODEL), concurrency, total=total)
    answered = redis_memory(url)
    time.sleep(1)
    return Memory(load, before, answered, redis_memory(url))


def metered(foreign: dict[str, float], phase: str, pids: list[int], run: Callable[[], T]) -> T:
    """``run()``, noting in ``foreign[phase]`` the share of the machine's CPU that went to
    processes other than this one and ``pids`` (with their descendants) meanwhile."""
    meter = CpuMeter(pids)
    result = run()
    foreign[phase] = meter.foreign_share()
    return result


@dataclass
class Served:
    latency: Latency
    batching: Batching
    plumbing: Plumbing
    memory: Memory
    foreign: dict[str, float] = field(default_factory=dict)


def measure_served(stack: BenchStack, args: argparse.Namespace) -> Served:
    """Every measurement of the running stack, each phase with its foreign CPU share."""
    foreign: dict[str, float] = {}
    pids, c, secs = stack.pids(), args.concurrency, args.seconds
    step(f"api: {args.requests} sequential requests, lean and official clients ...")
    latency = metered(foreign, "p50", pids, lambda: measure_latency(stack, args.requests))
    step(f"api: {c} concurrent clients for {secs:g} s ...")
    batching = metered(foreign, "load", pids, lambda: measure_batching(stack, c, secs))
    step(f"plumbing: {FAKE_MODEL} and GET /v1/models, {c} clients, {secs:g} s each ...")
    plumbing = metered(foreign, "plumbing", pids, lambda: measure_plumbing(stack, c, secs))
    step(f"plumbing: {args.plumbing_requests} {FAKE_MODEL} requests for Redis memory ...")
    memory = metered(
        foreign, "memory", pids, lambda: measure_memory(stack, c, args.plumbing_requests)
    )
    return Served(latency, batching, plumbing, memory, foreign)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def errors_note(*loads: Load) -> str:
    errors = sum(load.errors for load in loads)
    return f", {errors} errors" if errors else ""


def report_latency(before: Raw, after: Raw, lat: Latency, requests: int) -> list[Goal]:
    raw = statistics.mean([before.p50_s, after.p50_s])
    lean, official = lat.lean_s - raw, lat.official_s - raw
    print(
        f"model p50, one short input (tokenize + forward): {ms(before.p50_s)} before, "
        f"{ms(after.p50_s)} after the API runs"
    )
    print(
        f"p50, one short input, lean client (aiohttp, one kept-alive connection, base64, "
        f"{requests} sequential): API {ms(lat.lean_s)}, model {ms(raw)}, added {ms(lean)} "
        f"(goal <= 3 ms)"
    )
    print(
        f"p50, one short input, official openai client ({requests} sequential): API "
        f"{ms(lat.official_s)}, model {ms(raw)}, added {ms(official)} (the client's own cost "
        f"included; no goal)"
    )
    print(
        f"floor, GET /v1/models p50 (HTTP + uvicorn + FastAPI, no queue, no model): lean "
        f"client {ms(lat.lean_floor_s)}, official client {ms(lat.official_floor_s)}"
    )
    return [Goal("added p50, lean client", "<= 3 ms", ms(lean), lean <= 0.003)]


def report_batching(before: Raw, after: Raw, b: Batching, concurrency: int) -> list[Goal]:
    raw = statistics.mean([before.rate, after.rate])
    ratio = b.load.rate / raw
    print(
        f"model at batch {concurrency}: {before.rate:.0f} inputs/s before, {after.rate:.0f} after"
    )
    print(
        f"throughput: model at batch {concurrency} {raw:.0f} inputs/s, API with "
        f"{concurrency} concurrent clients {b.load.rate:.0f} inputs/s, ratio {ratio:.2f} "
        f"(goal >= 0.8){errors_note(b.load)}"
    )
    print(
        f"mean batch size per forward during the concurrent run: {b.mean:.1f} "
        f"({int(b.items)} inputs in {int(b.forwards)} forwards)"
    )
    return [Goal(f"API / model at batch {concurrency}", ">= 0.8", f"{ratio:.2f}", ratio >= 0.8)]


def report_plumbing(p: Plumbing, concurrency: int) -> list[Goal]:
    ratio = p.live.rate / p.models.rate if p.models.rate else 0.0
    print(
        f"plumbing ({FAKE_MODEL}, {concurrency} concurrent clients): live POST "
        f"/v1/embeddings {p.live.rate:.0f} requests/s, GET /v1/models {p.models.rate:.0f} "
        f"requests/s on the same API, ratio {ratio:.2f} (goal >= 0.5)"
        f"{errors_note(p.live, p.models)}"
    )
    cpu = p.live_cpu_ms
    print(
        f"CPU per fake live request ({p.live.requests} requests): API {cpu['API']:.3f} ms, "
        f"worker {cpu['worker']:.3f} ms, redis {cpu['redis']:.3f} ms (goal < 1 ms each); "
        f"load generator {cpu['bench']:.3f} ms"
    )
    cpu = p.models_cpu_ms
    print(
        f"CPU per GET /v1/models ({p.models.requests} requests, for reference): API "
        f"{cpu['API']:.3f} ms, worker {cpu['worker']:.3f} ms, redis {cpu['redis']:.3f} ms; "
        f"load generator {cpu['bench']:.3f} ms"
    )
    goals = [Goal("fake live / GET /v1/models", ">= 0.5", f"{ratio:.2f}", ratio >= 0.5)]
    for role in ("API", "worker", "redis"):
        value = p.live_cpu_ms[role]
        goals.append(Goal(f"{role} CPU per live request", "< 1 ms", f"{value:.3f} ms", value < 1))
    return goals


def report_memory(m: Memory) -> list[Goal]:
    def mb(r: RedisMemory) -> str:
        return f"{r.used_bytes / 1e6:.2f} MB"

    growth = m.growth_mb_per_10k
    print(
        f"Redis used_memory over {m.load.requests} fake live requests: before {mb(m.before)}, "
        f"all answered {mb(m.answered)}, 1 s later {mb(m.settled)}; growth per 10,000 "
        f"requests {growth:.3f} MB (goal < 1 MB){errors_note(m.load)}"
    )
    print(
        f"Redis keys laneway:* {m.before.laneway_keys} before, {m.answered.laneway_keys} all "
        f"answered, {m.settled.laneway_keys} 1 s later (DBSIZE {m.before.keys} -> "
        f"{m.settled.keys})"
    )
    return [Goal("Redis growth per 10,000 live", "< 1 MB", f"{growth:.3f} MB", growth < 1)]


def report_machine(before: Raw, after: Raw, foreign: dict[str, float], loads: list[Load]) -> Goal:
    shares = ", ".join(f"{share:.0%} during {phase}" for phase, share in foreign.items())
    print(f"CPU used by other processes on this machine: {shares}")
    if max(foreign.values()) > 0.1 or (
        abs(before.p50_s - after.p50_s) > 0.2 * min(before.p50_s, after.p50_s)
    ):
        print("WARNING: the machine was not quiet; these numbers are not trustworthy")
    errors = sum(load.errors for load in loads)
    return Goal("failed requests in the load runs", "0", str(errors), errors == 0)


def report(
    before: Raw, after: Raw, served: Served, peer: Peer | None, args: argparse.Namespace
) -> None:
    print()
    goals = report_latency(before, after, served.latency, args.requests)
    goals += report_batching(before, after, served.batching, args.concurrency)
    if peer is not None:
        report_peer(before, after, peer, args.concurrency)
    goals += report_plumbing(served.plumbing, args.concurrency)
    goals += report_memory(served.memory)
    p = served.plumbing
    loads = [served.batching.load, p.live, p.models, served.memory.load]
    goals.append(report_machine(before, after, served.foreign, loads))
    print_summary(goals)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=200, help="sequential samples for p50")
    parser.add_argument("--concurrency", type=int, default=64, help="clients and raw batch size")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each load run")
    parser.add_argument(
        "--plumbing-requests", type=int, default=10_000, help="fake live requests (Redis memory)"
    )
    parser.add_argument("--api-workers", type=int, default=1, help="API processes (uvicorn)")
    parser.add_argument("--peer-url", help="a peer serving the same model, measured after laneway")
    parser.add_argument("--peer-model", default="minilm", help="the model name the peer serves")
    parser.add_argument("--peer-path", default="/embeddings", help="the peer's embeddings route")
    return parser.parse_args()


def serve_and_measure(args: argparse.Namespace) -> Served:
    """Start the stack (MiniLM and the fake backend on one worker), measure, stop it."""
    with tempfile.TemporaryDirectory(prefix="laneway-bench-") as tmp:
        step("stack: starting redis-server, worker and API ...")
        stack = BenchStack(
            Path(tmp),
            LANEWAY_MODELS=f"{MODEL},{FAKE_MODEL}",
            LANEWAY_API_WORKERS=str(args.api_workers),
        )
        try:
            return measure_served(stack, args)
        finally:
            stack.close()


def main() -> None:
    args = parse_args()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {load}; API processes: {args.api_workers}",
        flush=True,
    )
    step("raw model: loading and measuring in-process ...")
    backend = load_backend()
    raw: dict[str, float] = {}
    before = metered(
        raw, "raw before", [], lambda: measure_raw(backend, args.requests, args.concurrency)
    )
    served = serve_and_measure(args)
    peer = measure_peer(args)  # its own processes are not ours: no foreign-CPU share
    step("raw model: measuring again after the stack stopped ...")
    after = metered(
        raw, "raw after", [], lambda: measure_raw(backend, args.requests, args.concurrency)
    )
    served.foreign = {"raw before": raw["raw before"], **served.foreign, **raw}
    report(before, after, served, peer, args)


if __name__ == "__main__":
    main()
