"""Live /v1/embeddings overhead and batching, against the raw model in the same run.

1. p50 of one short input: the model's own tokenize + forward, in this process, vs the
   API through the official `openai` client, sequential requests (goal: at most 3 ms added).
2. throughput: the model at batch 64 (distinct short texts) vs the API with 64 concurrent
   single-input clients sending distinct texts (goal: at least 0.8 of raw), and the mean
   batch size per forward the worker reported on the API's /metrics.

The model is measured before the stack starts and again after it has stopped (it stays
loaded but idle in between, so it never competes with the API for the CPUs); the two raw
runs show how steady the machine was. CPU time used by processes other than the bench's
own is reported too: anything else running on the machine makes the numbers meaningless.

    .venv/bin/python bench/embeddings_live.py [--requests 200] [--concurrency 64] [--seconds 20]
    ./dev bench embeddings_live [same options]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).parent))

from _stack import MODEL, BenchStack, CpuMeter, load_backend
from openai import OpenAI

TEXT = "The quick brown fox jumps over the lazy dog"


def distinct(i: int) -> str:
    return f"{TEXT} number {i}"


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


def api_p50(client: OpenAI, requests: int) -> float:
    """Sequential single-input requests through the official client (base64, its default)."""
    for _ in range(20):
        client.embeddings.create(model=MODEL, input=TEXT)
    samples = []
    for _ in range(requests):
        t0 = time.perf_counter()
        client.embeddings.create(model=MODEL, input=TEXT)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def http_floor(client: OpenAI, requests: int) -> float:
    """p50 of GET /v1/models through the same client: HTTP, uvicorn, FastAPI and the
    client's own cost, with no queue and no model (the floor under any added latency)."""
    for _ in range(20):
        client.models.list()
    samples = []
    for _ in range(requests):
        t0 = time.perf_counter()
        client.models.list()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def api_throughput(base: str, concurrency: int, seconds: float) -> tuple[float, int]:
    """(inputs/s, errors) with `concurrency` clients each sending one distinct text at a
    time, base64 as the official client asks. The load comes from one asyncio loop with
    aiohttp: 64 threads of the `openai` client (or httpx with 64 connections) cost more CPU
    than the server on 2 cores and would measure the client, not laneway."""

    async def run() -> tuple[float, int]:
        done = errors = 0
        stop = asyncio.Event()
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(base, connector=connector) as http:

            async def client_loop(k: int) -> None:
                nonlocal done, errors
                i = 0
                while not stop.is_set():
                    body = {
                        "model": MODEL,
                        "input": distinct(k * 1_000_000 + i),
                        "encoding_format": "base64",
                    }
                    async with http.post("/v1/embeddings", json=body) as r:
                        await r.read()
                        if r.status != 200:
                            errors += 1
                            continue
                    i += 1
                    done += 1

            tasks = [asyncio.create_task(client_loop(k)) for k in range(concurrency)]
            await asyncio.sleep(2)  # ramp up
            start_count, t0 = done, time.perf_counter()
            await asyncio.sleep(seconds)
            rate = (done - start_count) / (time.perf_counter() - t0)
            stop.set()
            await asyncio.gather(*tasks)
        return rate, errors

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=200, help="sequential samples for p50")
    parser.add_argument("--concurrency", type=int, default=64, help="clients and raw batch size")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the load run")
    args = parser.parse_args()

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {load}",
        flush=True,
    )
    print("raw model: loading and measuring in-process ...", flush=True)
    backend = load_backend()
    meter = CpuMeter()
    before = measure_raw(backend, args.requests, args.concurrency)
    raw_foreign = meter.foreign_share()

    with tempfile.TemporaryDirectory(prefix="laneway-bench-") as tmp:
        print("stack: starting redis-server, worker and API ...", flush=True)
        stack = BenchStack(Path(tmp))
        try:
            client = OpenAI(base_url=f"{stack.base}/v1", api_key="bench", max_retries=0)
            print(f"api: {args.requests} sequential requests ...", flush=True)
            meter = CpuMeter(stack.pids())
            p50 = api_p50(client, args.requests)
            floor = http_floor(client, args.requests)
            p50_foreign = meter.foreign_share()
            time.sleep(3)  # let the worker publish its counters (every ~2 s)
            forwards0 = stack.metric("laneway_forward_batch_size_count")
            items0 = stack.metric("laneway_forward_batch_size_sum")
            print(
                f"api: {args.concurrency} concurrent clients for {args.seconds:g} s ...", flush=True
            )
            meter = CpuMeter(stack.pids())
            rate, errors = api_throughput(stack.base, args.concurrency, args.seconds)
            load_foreign = meter.foreign_share()
            time.sleep(3)
            forwards = stack.metric("laneway_forward_batch_size_count") - forwards0
            items = stack.metric("laneway_forward_batch_size_sum") - items0
        finally:
            stack.close()

    print("raw model: measuring again after the stack stopped ...", flush=True)
    after = measure_raw(backend, args.requests, args.concurrency)
    del backend

    raw_p50 = statistics.mean([before.p50_s, after.p50_s])
    raw_rate = statistics.mean([before.rate, after.rate])
    mean = items / forwards if forwards else float("nan")
    print()
    print(
        f"model p50, one short input (tokenize + forward): {before.p50_s * 1e3:.2f} ms before, "
        f"{after.p50_s * 1e3:.2f} ms after the API runs"
    )
    print(
        f"p50, one short input: model {raw_p50 * 1e3:.2f} ms, API {p50 * 1e3:.2f} ms "
        f"(official client, {args.requests} sequential), added {(p50 - raw_p50) * 1e3:.2f} ms "
        f"(goal <= 3 ms)"
    )
    print(
        f"of which HTTP + client + FastAPI alone (GET /v1/models, same client, p50): "
        f"{floor * 1e3:.2f} ms"
    )
    print(
        f"model at batch {args.concurrency}: {before.rate:.0f} inputs/s before, "
        f"{after.rate:.0f} after"
    )
    print(
        f"throughput: model at batch {args.concurrency} {raw_rate:.0f} inputs/s, API with "
        f"{args.concurrency} concurrent clients {rate:.0f} inputs/s, ratio "
        f"{rate / raw_rate:.2f} (goal >= 0.8){f', {errors} errors' if errors else ''}"
    )
    print(
        f"mean batch size per forward during the concurrent run: {mean:.1f} "
        f"({int(items)} inputs in {int(forwards)} forwards)"
    )
    print(
        f"CPU used by other processes on this machine: {raw_foreign:.0%} during the raw "
        f"run, {p50_foreign:.0%} during the p50 run, {load_foreign:.0%} during the load run"
    )
    if max(raw_foreign, p50_foreign, load_foreign) > 0.1 or (
        abs(before.p50_s - after.p50_s) > 0.2 * min(before.p50_s, after.p50_s)
    ):
        print("WARNING: the machine was not quiet; these numbers are not trustworthy")


if __name__ == "__main__":
    main()
