"""Batch ETAs against the real completion: a 10,000-line embeddings batch on the packaged
MiniLM. Not part of the test run. Starts its own stack (embedded redis-server, SQLite, one
CPU worker, the API) and, in this one run:

1. runs a 1,000-line warm-up batch, so the worker folds its rates into a rolling record
   (``LANEWAY_ROLLING_EVERY_S=2``), and asks ``/v1/benchmarks/estimate`` about the big
   batch's input file: the estimate before it starts on the rolling record alone;
2. with ``--benchmark`` (the default), runs ``laneway benchmark`` against the stack (a
   concurrency sweep through the live lane) and asks again: the estimate on a benchmark
   record, which estimates prefer;
3. runs the batch, polling it every 0.2 s, and compares with its real completion: the
   estimate before it starts (goal: within ±50 %) and the batch object's
   ``estimated_completion_at`` at 20 % of its lines (goal: within ±25 %, of the time
   that really remained then, and of the whole run).

    ./dev bench batch_eta [--lines 10000] [--no-benchmark] [--concurrency 1,8,32]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from openai import OpenAI

sys.path.insert(0, str(Path(__file__).parent))
from _stack import MODEL, BenchStack
from batch_embeddings import jsonl, texts


def wait_batch(client: OpenAI, batch_id: str, every: float = 0.2) -> list[tuple[float, Any]]:
    """Poll until the batch is finished: (wall time, batch object) at each poll."""
    seen = []
    while True:
        batch = client.batches.retrieve(batch_id)
        seen.append((time.time(), batch))
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return seen
        time.sleep(every)


def wait_rolling(http: httpx.Client, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = http.get(f"/v1/benchmarks/models/{MODEL}", params={"limit": 100}).json()["data"]
        rolling = [r for r in rows if r["source"] == "rolling"]
        if rolling:
            return rolling[0]
        time.sleep(0.5)
    raise SystemExit("no rolling record appeared: is LANEWAY_ROLLING_EVERY_S set?")


def estimate(http: httpx.Client, file_id: str) -> dict[str, Any]:
    out = http.get("/v1/benchmarks/estimate", params={"input_file_id": file_id})
    out.raise_for_status()
    return dict(out.json())


def run_benchmark(stack: BenchStack, concurrency: str) -> None:
    """``laneway benchmark`` against the stack, storing its records in the stack's database."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "laneway",
            "benchmark",
            MODEL,
            "--base-url",
            stack.base,
            "--concurrency",
            concurrency,
        ],
        env=stack.env,
        check=True,
    )


def error(predicted: float, real: float) -> str:
    return f"{predicted:7.1f} s vs {real:7.1f} s real: {100 * (predicted - real) / real:+6.1f} %"


def at_share(polls: list[tuple[float, Any]], share: float) -> tuple[float, Any]:
    for at, batch in polls:
        counts = batch.request_counts
        if counts.total and (counts.completed + counts.failed) / counts.total >= share:
            return at, batch
    raise SystemExit(f"the batch never reached {share:.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--warmup-lines", type=int, default=1_000)
    parser.add_argument("--no-benchmark", dest="benchmark", action="store_false")
    parser.add_argument("--concurrency", default="1,8,32")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="laneway-eta-") as tmp:
        stack = BenchStack(Path(tmp), LANEWAY_ROLLING_EVERY_S="2")
        try:
            measure(stack, args)
        finally:
            stack.close()


def measure(stack: BenchStack, args: argparse.Namespace) -> None:
    client = OpenAI(base_url=f"{stack.base}/v1", api_key="unused", max_retries=0)
    http = httpx.Client(base_url=stack.base, timeout=60)
    warm = client.files.create(
        file=("warm.jsonl", jsonl(texts(args.warmup_lines), prefix="warm")), purpose="batch"
    )
    warm_batch = client.batches.create(
        input_file_id=warm.id, endpoint="/v1/embeddings", completion_window="24h"
    )
    wait_batch(client, warm_batch.id)
    rolling = wait_rolling(http)
    inputs = [f"{t} (big)" for t in texts(args.lines)]
    upload = client.files.create(file=("big.jsonl", jsonl(inputs, prefix="big")), purpose="batch")
    on_rolling = estimate(http, upload.id)
    on_benchmark = None
    if args.benchmark:
        run_benchmark(stack, args.concurrency)
        on_benchmark = estimate(http, upload.id)

    began = time.time()
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h"
    )
    polls = wait_batch(client, batch.id)
    ended, last = polls[-1]
    assert last.status == "completed", last
    real = ended - began
    at, fifth = at_share(polls, 0.2)
    eta = (fifth.model_extra or {}).get("estimated_completion_at")

    print(f"\n{args.lines}-line batch on {MODEL}: {real:.1f} s ({args.lines / real:.0f} lines/s)")
    print(f"rolling record: {rolling['requests_per_s']:.0f} inputs per forward-second")
    print(f"before it starts, on the rolling record:   {error(on_rolling['seconds'], real)}")
    if on_benchmark is not None:
        basis = on_benchmark["basis"]
        print(
            f"before it starts, on the benchmark record: {error(on_benchmark['seconds'], real)}"
            f"  ({basis['requests_per_s']:.0f} requests/s)"
        )
    if eta is None:
        print("at 20 %: the batch object carried no estimate")
        return
    print(f"at 20 % ({at - began:.1f} s in), estimated_completion_at:")
    print(f"  time remaining: {error(eta - at, ended - at)}")
    print(f"  whole run:      {error(eta - began, real)}")
    print("goals: before it starts within ±50 %; at 20 % within ±25 %")


if __name__ == "__main__":
    main()
