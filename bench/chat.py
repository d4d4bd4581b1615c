"""Live chat: throughput and time to first token, against the raw model and a peer.

Not part of the test run. Builds a random-weight Llama (8 layers, hidden 768, 12 heads,
intermediate 3072, the MiniLM tokenizer with ChatML markers: tests/chat_models.py) with
no eos, so every request generates exactly ``--max-tokens``, and prints, from one run:

1. raw: the same ``--requests`` prompts through ``model.generate(max_new_tokens,
   do_sample=False)`` one after another in this process (tokens/s), before the servers
   run and again after (the mean is compared); plus the raw first token (prefill) and one
   decode step at batch 1 and at the served batch size (``--max-running``).
2. laneway: the stack (embedded redis-server, SQLite, one ``--capability chat`` CPU
   worker, the API) serving the model from a catalog entry; ``--requests`` concurrent
   ``POST /v1/chat/completions`` (non-streamed, temperature 0): completion tokens/s and
   the ratio to raw. Time to first token p50 (``stream: true``: the first SSE chunk whose
   ``delta.content`` is not empty), idle, and while a ``--batch-lines`` chat batch runs
   (uploaded with ``POST /v1/files``, created with ``POST /v1/batches``, cancelled after
   the probes).
3. peer: ``transformers serve MODEL_DIR --continuous-batching`` (shared/PEERS.md, with
   HF_HUB_OFFLINE=1) under the same load and the same probes, after laneway has stopped.

Goals: laneway's ratio to raw >= the peer's; laneway's idle TTFT p50 <= the peer's; TTFT
under the batch <= 1.5 x idle + one decode step at the served batch size.

    .venv/bin/python bench/chat.py [--requests 16] [--max-tokens 64] [--ttft-requests 20]
        [--batch-lines 2000] [--max-running 16] [--no-peer | --only-peer] [--peer-port 8900]
    ./dev bench chat [same options]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import httpx

# bench/ for _stack, the repository root for tests.chat_models (the model builder)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _stack import CpuMeter, Goal, print_summary

from laneway.embedded_redis import free_port
from laneway.stack import Processes, wait_healthy
from tests.chat_models import build_llama, chat_entry, write_catalog

MODEL_ID = "bench/chat-llama"
CHAT = "/v1/chat/completions"
FINISHED = ("completed", "failed", "expired", "cancelled")
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


async def _probes(base: str, bodies: list[dict[str, Any]], warmup: int) -> list[float]:
    async with _session(base, 1) as http:
        samples = [await _first_token(http, body) for body in bodies]
    return samples[warmup:]


def ttft_samples(base: str, model: str, n: int, kind: str, warmup: int = 3) -> list[float]:
    """Time to first token of ``n`` streamed requests sent one at a time on one kept-alive
    connection, after ``warmup`` unmeasured ones."""
    bodies = [chat_body(model, i, 8, kind) for i in range(warmup + n)]
    return asyncio.run(_probes(base, bodies, warmup))


def warm_up(base: str, model: str, concurrency: int) -> None:
    """One concurrent round of short requests: first-call costs out of the measurements."""
    load = concurrent(base, [chat_body(model, 1000 + i, 8, "warm-up") for i in range(concurrency)])
    if load.errors:
        raise RuntimeError(f"warm-up failed: {load.errors[0]}")


# ------------------------------------------------------------------------------ servers


@dataclass
class Served:
    name: str
    load: Throughput
    ttft_idle: list[float]
    ttft_busy: list[float] = field(default_factory=list)
    batch_note: str = ""
    foreign: float = 0.0

    @property
    def idle_p50(self) -> float:
        return statistics.median(self.ttft_idle)

    @property
    def busy_p50(self) -> float:
        return statistics.median(self.ttft_busy) if self.ttft_busy else float("nan")


class ChatStack:
    """Redis, migrations, one CPU chat worker and the API (laneway.stack, as `laneway up`
    and bench/_stack.py start them), serving ``MODEL_ID`` from ``catalog``."""

    def __init__(self, root: Path, catalog: Path, *, health_timeout: float = 300) -> None:
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "LANEWAY_DATA_DIR": str(root),
            "LANEWAY_DATABASE_URL": f"sqlite:///{root}/laneway.db",
            "LANEWAY_MODEL_CONFIG": str(catalog),
            "LANEWAY_MODELS": MODEL_ID,
            "LANEWAY_LOG_LEVEL": "WARNING",
        }
        self.root = root
        self.procs = Processes(env, log_dir=root / "logs", cwd=root)
        try:
            self.redis, url = self.procs.redis(root / "redis")
            self.procs.env["LANEWAY_REDIS_URL"] = url
            self.procs.migrate()
            port = free_port()
            self.worker = self.procs.worker("chat", device="cpu")
            self.api = self.procs.api(host="127.0.0.1", port=port)
            self.base = f"http://127.0.0.1:{port}"
            wait_healthy(self.base, health_timeout, check=self._alive)
        except BaseException:
            self.close()
            raise

    def _alive(self) -> None:
        for proc in (self.worker, self.api):
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited")

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


@contextlib.contextmanager
def running_batch(
    base: str, lines: int, max_tokens: int, settle_s: float = 3.0
) -> Iterator[Callable[[], str]]:
    """A ``lines``-line chat batch, created and in progress for ``settle_s``; yields a
    function describing its progress (request counts move as chunks finish); cancels it
    on exit."""
    with httpx.Client(base_url=base, timeout=120) as http:
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
            r = http.get(f"/v1/batches/{batch_id}")
            r.raise_for_status()
            return dict(r.json())

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


def measure_laneway(model_dir: Path, args: argparse.Namespace) -> Served:
    with tempfile.TemporaryDirectory(prefix="laneway-bench-") as tmp:
        root = Path(tmp)
        entry = chat_entry(
            MODEL_ID,
            model_dir,
            max_input_tokens=512,
            max_tokens=args.max_tokens,
            max_running=args.max_running,
            batch_token_budget=8192,
        )
        catalog = write_catalog(root / "catalog.yaml", [entry])
        step("laneway: starting redis-server, chat worker and API ...")
        stack = ChatStack(root, catalog)
        try:
            meter = CpuMeter(stack.pids())
            warm_up(stack.base, MODEL_ID, args.requests)
            step(f"laneway: {args.requests} concurrent requests of {args.max_tokens} tokens ...")
            bodies = [chat_body(MODEL_ID, i, args.max_tokens) for i in range(args.requests)]
            load = concurrent(stack.base, bodies)
            step(f"laneway: {args.ttft_requests} streamed requests, idle ...")
            idle = ttft_samples(stack.base, MODEL_ID, args.ttft_requests, "idle")
            served = Served("laneway", load, idle)
            if args.batch_lines:
                step(
                    f"laneway: {args.batch_lines}-line chat batch, streamed requests meanwhile ..."
                )
                with running_batch(stack.base, args.batch_lines, args.max_tokens) as progress:
                    before = progress()
                    served.ttft_busy = ttft_samples(
                        stack.base, MODEL_ID, args.ttft_requests, "busy", warmup=0
                    )
                    after = progress()
                    served.batch_note = f"batch {before} before the probes, {after} after"
                    if not after.startswith("in_progress"):
                        served.batch_note += " (WARNING: it ended during the probes)"
            served.foreign = meter.foreign_share()
            return served
        except BaseException:
            print(stack.logs_tail(), file=sys.stderr)
            raise
        finally:
            stack.close()


class Peer:
    """``transformers serve MODEL_DIR --continuous-batching`` in its own session."""

    def __init__(self, model_dir: Path, port: int, log: Path) -> None:
        self.base = f"http://127.0.0.1:{port}"
        if httpx_ok(f"{self.base}/health"):
            raise RuntimeError(f"something already answers on port {port}")
        argv = [
            str(Path(sys.executable).with_name("transformers")),
            "serve",
            str(model_dir),
            "--continuous-batching",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--device",
            "cpu",
        ]
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                argv,
                env={**os.environ, "HF_HUB_OFFLINE": "1"},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 300
        while not httpx_ok(f"{self.base}/health"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"transformers serve did not come up:\n{tail}")
            time.sleep(0.5)

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def httpx_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def measure_peer(model_dir: Path, args: argparse.Namespace) -> Served:
    with tempfile.TemporaryDirectory(prefix="laneway-bench-peer-") as tmp:
        step(f"peer: starting transformers serve --continuous-batching on :{args.peer_port} ...")
        peer = Peer(model_dir, args.peer_port, Path(tmp) / "serve.log")
        try:
            meter = CpuMeter([peer.proc.pid])
            name = str(model_dir)  # the peer's model name is the directory as given
            warm_up(peer.base, name, args.requests)
            step(f"peer: {args.requests} concurrent requests of {args.max_tokens} tokens ...")
            bodies = [chat_body(name, i, args.max_tokens) for i in range(args.requests)]
            load = concurrent(peer.base, bodies)
            step(f"peer: {args.ttft_requests} streamed requests, idle ...")
            idle = ttft_samples(peer.base, name, args.ttft_requests, "idle")
            return Served("peer", load, idle, foreign=meter.foreign_share())
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
        f"{s.name}: time to first streamed token p50, idle: {ms(s.idle_p50)} "
        f"({len(s.ttft_idle)} requests; raw first token {ms(raw.first_token_s)})"
    )
    if s.ttft_busy:
        print(
            f"{s.name}: time to first streamed token p50 during the batch: {ms(s.busy_p50)} "
            f"({len(s.ttft_busy)} requests; {s.batch_note})"
        )
    if s.foreign > 0.1:
        print(f"WARNING: other processes took {s.foreign:.0%} of the CPU during {s.name}'s runs")


def goals(laneway: Served | None, peer: Served | None, raw_rate: float, raw: Raw) -> list[Goal]:
    out: list[Goal] = []
    if laneway is not None and peer is not None:
        mine, theirs = laneway.load.rate / raw_rate, peer.load.rate / raw_rate
        out.append(
            Goal(
                "ratio to raw, laneway vs peer",
                ">= peer",
                f"{mine:.2f} vs {theirs:.2f}",
                mine >= theirs,
            )
        )
        out.append(
            Goal(
                "idle TTFT p50, laneway vs peer",
                "<= peer",
                f"{ms(laneway.idle_p50)} vs {ms(peer.idle_p50)}",
                laneway.idle_p50 <= peer.idle_p50,
            )
        )
    if laneway is not None and laneway.ttft_busy:
        limit = 1.5 * laneway.idle_p50 + raw.step_batch_s
        out.append(
            Goal(
                "TTFT p50 under the batch",
                f"<= {ms(limit)}",
                ms(laneway.busy_p50),
                laneway.busy_p50 <= limit,
            )
        )
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
    parser.add_argument("--ttft-requests", type=int, default=20, help="streamed probes per p50")
    parser.add_argument("--batch-lines", type=int, default=2000, help="0: no batch phase")
    parser.add_argument("--max-running", type=int, default=16, help="catalog max_running")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=3072)
    parser.add_argument("--peer-port", type=int, default=8900)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--no-peer", action="store_true", help="skip transformers serve")
    which.add_argument("--only-peer", action="store_true", help="raw and peer, no laneway")
    parser.add_argument("--no-raw-after", action="store_true", help="measure raw once only")
    return parser.parse_args()


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
    step(f"model: built in {time.perf_counter() - t0:.1f} s at {path}")
    return path


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
        f"load average {load}",
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
        peer = None if args.no_peer else attempt("peer", lambda: measure_peer(model_dir, args))
        after = None
        if not args.no_raw_after:
            step("raw: measuring again after the servers stopped ...")
            after = raw_model.rate_only(args.requests, args.max_tokens)

        print()
        raw_rate = report_raw(raw, after, args)
        if raw_foreign > 0.1:
            print(f"WARNING: other processes took {raw_foreign:.0%} of the CPU during raw runs")
        for served in (laneway, peer):
            if served is not None:
                report_served(served, raw_rate, raw)
        if laneway is None and not args.only_peer:
            print("laneway: no numbers (see FAILED above)")
        print_summary(goals(laneway, peer, raw_rate, raw))


if __name__ == "__main__":
    main()
