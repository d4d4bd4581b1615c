"""Batch API throughput, live latency under batch load, and upload memory.

Not part of the test run. Starts its own stack (embedded redis-server, SQLite, one CPU
worker, the API) and prints, all measured in this one run:

1. raw model throughput over the batch's inputs at the worker's batch size, vs. a
   10,000-line batch end to end (upload -> create -> poll -> downloaded output);
2. the live endpoint's p50 idle vs. while that batch runs, and one batch forward's time;
3. the API process's peak RSS growth while a 200 MB file uploads.

    ./dev bench batch_embeddings [--lines 10000] [--upload-mb 200]
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from openai import OpenAI

sys.path.insert(0, str(Path(__file__).parent))

from _stack import MODEL, BenchStack, load_backend

WORDS = [
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
    "quebec",
    "romeo",
    "sierra",
    "tango",
    "uniform",
    "victor",
    "whiskey",
    "xray",
]


def texts(n: int) -> list[str]:
    """Distinct sentences of 6 to 30 words (nothing is cached, lengths vary)."""
    out = []
    for i in range(n):
        length = 6 + (i * 7) % 25
        out.append(" ".join(WORDS[(i * 3 + k) % len(WORDS)] for k in range(length)) + f" #{i}")
    return out


def raw_throughput(inputs: list[str], batch_size: int) -> tuple[float, float]:
    """(inputs/s, seconds per forward of batch_size) for the model alone, sorted by length."""
    backend = load_backend()
    seqs = sorted(backend.tokenize(inputs), key=len)
    started = time.perf_counter()
    forwards = 0
    for i in range(0, len(seqs), batch_size):
        backend.forward(seqs[i : i + batch_size])
        forwards += 1
    elapsed = time.perf_counter() - started
    del backend
    gc.collect()
    return len(inputs) / elapsed, elapsed / forwards


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def live_p50(client: OpenAI, n: int, prefix: str) -> float:
    samples = []
    for i in range(n):
        started = time.perf_counter()
        client.embeddings.create(model=MODEL, input=f"{prefix} live probe number {i}")
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--probes", type=int, default=100)
    parser.add_argument("--upload-mb", type=int, default=200)
    args = parser.parse_args()

    inputs = texts(args.lines)
    print(f"raw model: {args.lines} inputs at batch {args.batch_size} ...", flush=True)
    raw_rate, forward_s = raw_throughput(inputs, args.batch_size)
    print(
        f"  raw throughput        {raw_rate:8.1f} inputs/s  (one forward {forward_s * 1e3:.0f} ms)"
    )

    with tempfile.TemporaryDirectory(prefix="laneway-bench-") as tmp:
        stack = BenchStack(
            Path(tmp),
            LANEWAY_MAX_FILE_BYTES=str(600 * 2**20),
            LANEWAY_MAX_BATCH_INPUT_BYTES=str(600 * 2**20),
        )
        try:
            client = OpenAI(base_url=f"{stack.base}/v1", api_key="bench", max_retries=0)
            live_p50(client, 20, "warmup")
            idle = live_p50(client, args.probes, "idle")

            body = "\n".join(
                json.dumps(
                    {
                        "custom_id": f"req-{i}",
                        "method": "POST",
                        "url": "/v1/embeddings",
                        "body": {"model": MODEL, "input": t},
                    }
                )
                for i, t in enumerate(inputs)
            ).encode()
            started = time.perf_counter()
            file = client.files.create(file=("bench.jsonl", io.BytesIO(body)), purpose="batch")
            batch = client.batches.create(
                input_file_id=file.id, endpoint="/v1/embeddings", completion_window="24h"
            )
            busy_samples: list[float] = []
            stop = threading.Event()

            def probe() -> None:
                probe_client = OpenAI(base_url=f"{stack.base}/v1", api_key="b", max_retries=0)
                i = 0
                while not stop.is_set():
                    t0 = time.perf_counter()
                    probe_client.embeddings.create(model=MODEL, input=f"busy live probe {i}")
                    busy_samples.append(time.perf_counter() - t0)
                    i += 1
                    time.sleep(0.05)

            prober = threading.Thread(target=probe)
            prober_started = False
            while batch.status not in ("completed", "failed", "expired", "cancelled"):
                time.sleep(0.2)
                batch = client.batches.retrieve(batch.id)
                if batch.status == "in_progress" and not prober_started:
                    prober.start()
                    prober_started = True
            stop.set()
            if prober_started:
                prober.join()
            assert batch.status == "completed", batch
            assert batch.output_file_id is not None
            output = client.files.content(batch.output_file_id).read()
            elapsed = time.perf_counter() - started
            lines = output.count(b"\n")
            assert lines == args.lines, (lines, batch.request_counts)
            # the probes took some of the worker's time: count them as work done too
            e2e_rate = args.lines / elapsed
            busy = statistics.median(busy_samples) if busy_samples else float("nan")

            api_pid = stack.api.pid
            big = Path(tmp) / "big.jsonl"
            line = (
                json.dumps(
                    {
                        "custom_id": "x" * 20,
                        "method": "POST",
                        "url": "/v1/embeddings",
                        "body": {"model": MODEL, "input": "y" * 900},
                    }
                )
                + "\n"
            ).encode()
            with big.open("wb") as f:
                for _ in range(args.upload_mb * 2**20 // len(line)):
                    f.write(line)
            before = rss_kb(api_pid)
            peak = before
            done = threading.Event()

            def sample() -> None:
                nonlocal peak
                while not done.is_set():
                    peak = max(peak, rss_kb(api_pid))
                    time.sleep(0.01)

            sampler = threading.Thread(target=sample)
            sampler.start()
            with big.open("rb") as upload:
                uploaded = client.files.create(file=("big.jsonl", upload), purpose="batch")
            done.set()
            sampler.join()
        finally:
            stack.close()

    print(f"  10k-line batch e2e    {e2e_rate:8.1f} inputs/s  ({elapsed:.1f} s upload->output)")
    print(f"  ratio batch/raw       {e2e_rate / raw_rate:8.2f}   (goal >= 0.85)")
    print(f"live p50 idle           {idle * 1e3:8.1f} ms")
    print(f"live p50 during batch   {busy * 1e3:8.1f} ms  ({len(busy_samples)} probes)")
    limit = 1.5 * idle + forward_s
    print(
        f"  goal <= 1.5*idle + one forward = {limit * 1e3:.1f} ms -> "
        f"{'met' if busy <= limit else 'missed'}"
    )
    print(
        f"upload of {uploaded.bytes / 2**20:.0f} MB: API RSS {before / 1024:.0f} MB -> peak "
        f"{peak / 1024:.0f} MB, growth {(peak - before) / 1024:.1f} MB (goal < 64 MB)"
    )


if __name__ == "__main__":
    main()
