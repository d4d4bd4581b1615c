"""Live /v1/embeddings overhead and batching, against the raw model in the same run.

1. p50 of one short input: the model's own forward vs the API through the official
   `openai` client (goal: at most 3 ms added).
2. throughput: the model at batch 64 vs the API with 64 concurrent single-input clients
   (goal: at least 0.8 of raw), and the mean batch size per forward the worker reported.

    ./dev bench embeddings_live [--requests 300] [--concurrency 64] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).parent))

from _stack import MODEL, BenchStack, load_backend
from openai import OpenAI

TEXT = "The quick brown fox jumps over the lazy dog"


def distinct(i: int) -> str:
    return f"{TEXT} number {i}"


def raw_numbers(requests: int, concurrency: int) -> tuple[float, float]:
    """(p50 seconds of one short input, inputs/s at batch `concurrency`)."""
    backend = load_backend()
    one = backend.tokenize([TEXT])
    for _ in range(20):
        backend.forward(one)
    samples = []
    for _ in range(requests):
        t0 = time.perf_counter()
        backend.forward(one)
        samples.append(time.perf_counter() - t0)
    batch = backend.tokenize([distinct(i) for i in range(concurrency)])
    backend.forward(batch)
    rounds = 10
    t0 = time.perf_counter()
    for _ in range(rounds):
        backend.forward(batch)
    rate = rounds * concurrency / (time.perf_counter() - t0)
    del backend
    gc.collect()
    return statistics.median(samples), rate


def api_p50(client: OpenAI, requests: int) -> float:
    for _ in range(20):
        client.embeddings.create(model=MODEL, input=TEXT)
    samples = []
    for _ in range(requests):
        t0 = time.perf_counter()
        client.embeddings.create(model=MODEL, input=TEXT)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def api_throughput(base: str, concurrency: int, seconds: float) -> float:
    """Single-input requests from `concurrency` clients at once, base64 as the official
    client asks. The load comes from one asyncio loop with aiohttp: threads of the `openai`
    client (or httpx with 64 connections) cost more CPU than the server on 2 cores."""

    async def run() -> float:
        done = 0
        stop = asyncio.Event()
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(base, connector=connector) as http:

            async def client_loop(k: int) -> None:
                nonlocal done
                i = 0
                while not stop.is_set():
                    body = {
                        "model": MODEL,
                        "input": distinct(k * 1_000_000 + i),
                        "encoding_format": "base64",
                    }
                    async with http.post("/v1/embeddings", json=body) as r:
                        r.raise_for_status()
                        await r.read()
                    i += 1
                    done += 1

            tasks = [asyncio.create_task(client_loop(k)) for k in range(concurrency)]
            await asyncio.sleep(2)  # ramp up
            start_count, t0 = done, time.perf_counter()
            await asyncio.sleep(seconds)
            rate = (done - start_count) / (time.perf_counter() - t0)
            stop.set()
            await asyncio.gather(*tasks)
        return rate

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()

    raw_p50, raw_rate = raw_numbers(args.requests, args.concurrency)
    with tempfile.TemporaryDirectory(prefix="laneway-bench-") as tmp:
        stack = BenchStack(Path(tmp))
        try:
            client = OpenAI(base_url=f"{stack.base}/v1", api_key="bench", max_retries=0)
            p50 = api_p50(client, args.requests)
            time.sleep(3)  # let the worker publish its counters
            forwards0 = stack.metric("laneway_forward_batch_size_count")
            items0 = stack.metric("laneway_forward_batch_size_sum")
            rate = api_throughput(stack.base, args.concurrency, args.seconds)
            time.sleep(3)
            forwards = stack.metric("laneway_forward_batch_size_count") - forwards0
            items = stack.metric("laneway_forward_batch_size_sum") - items0
        finally:
            stack.close()

    print(
        f"p50, one short input: model {raw_p50 * 1e3:.2f} ms, API {p50 * 1e3:.2f} ms, "
        f"added {(p50 - raw_p50) * 1e3:.2f} ms (goal <= 3 ms)"
    )
    print(
        f"throughput: model at batch {args.concurrency} {raw_rate:.0f} inputs/s, API with "
        f"{args.concurrency} concurrent clients {rate:.0f} inputs/s, ratio "
        f"{rate / raw_rate:.2f} (goal >= 0.8)"
    )
    mean = items / forwards if forwards else float("nan")
    print(
        f"mean batch size per forward during the concurrent run: {mean:.1f} "
        f"({int(items)} inputs in {int(forwards)} forwards)"
    )


if __name__ == "__main__":
    main()
