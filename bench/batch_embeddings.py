"""Batch API throughput, live latency under batch load, and upload memory.

Not part of the test run. Starts its own stack (embedded redis-server, SQLite, one CPU
worker, the API) and prints, all measured in this one run:

1. raw model throughput over the batch's inputs at the worker's batch size, vs. a
   10,000-line batch end to end (upload -> create -> poll -> downloaded output);
2. the live endpoint's p50 idle vs. while that batch runs, and one batch forward's time;
3. the same with 40 batches open at once (the same inputs split 40 ways), and how many
   times their chunks were claimed (one claim a chunk: nothing ran twice);
4. the API process's peak RSS growth while a 200 MB file uploads.

    ./dev bench batch_embeddings [--lines 10000] [--open-batches 40] [--upload-mb 200]
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
from sqlalchemy import create_engine, text

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


def jsonl(inputs: list[str], prefix: str = "req") -> bytes:
    return "\n".join(
        json.dumps(
            {
                "custom_id": f"{prefix}-{i}",
                "method": "POST",
                "url": "/v1/embeddings",
                "body": {"model": MODEL, "input": t},
            }
        )
        for i, t in enumerate(inputs)
    ).encode()


class Prober:
    """Live requests, one at a time with a short pause, on their own thread and client,
    until stopped; their latencies."""

    def __init__(self, base: str) -> None:
        self.client = OpenAI(base_url=f"{base}/v1", api_key="bench", max_retries=0)
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            t0 = time.perf_counter()
            self.client.embeddings.create(model=MODEL, input=f"busy live probe {i}")
            self.samples.append(time.perf_counter() - t0)
            i += 1
            time.sleep(0.05)

    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    def stop(self) -> float:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        return statistics.median(self.samples) if self.samples else float("nan")


FINISHED = ("completed", "failed", "expired", "cancelled")


def run_batches(client: OpenAI, base: str, bodies: list[bytes]) -> tuple[list, float, Prober]:
    """Upload and create one batch per body, probe live latency while any is in progress,
    wait for all; returns (batches, seconds upload -> last output downloaded, prober)."""
    started = time.perf_counter()
    batches = []
    for n, body in enumerate(bodies):
        file = client.files.create(file=(f"bench{n}.jsonl", io.BytesIO(body)), purpose="batch")
        batches.append(
            client.batches.create(
                input_file_id=file.id, endpoint="/v1/embeddings", completion_window="24h"
            )
        )
    prober = Prober(base)
    while any(b.status not in FINISHED for b in batches):
        time.sleep(0.2)
        batches = [b if b.status in FINISHED else client.batches.retrieve(b.id) for b in batches]
        if any(b.status == "in_progress" for b in batches):
            prober.start()
    prober.stop()
    for batch in batches:
        assert batch.status == "completed" and batch.output_file_id is not None, batch
        client.files.content(batch.output_file_id).read()
    return batches, time.perf_counter() - started, prober


def claims(db_path: Path, batch_ids: list[str]) -> tuple[int, int]:
    """(chunks, claims of them) from the stack's SQLite file."""
    engine = create_engine(f"sqlite:///{db_path}")
    marks = ",".join(f"'{b}'" for b in batch_ids)  # our own ids: [a-z0-9_]
    with engine.connect() as conn:
        count, attempts = conn.execute(
            text(f"SELECT count(*), sum(attempts) FROM batch_chunks WHERE batch_id IN ({marks})")
        ).one()
    engine.dispose()
    return int(count), int(attempts or 0)


def upload_growth(client: OpenAI, api_pid: int, root: Path, megabytes: int) -> tuple[int, int, int]:
    """(bytes uploaded, API RSS before, peak) in KB for one upload of ``megabytes``."""
    big = root / "big.jsonl"
    line = jsonl(["y" * 900], prefix="x" * 16) + b"\n"
    with big.open("wb") as f:
        for _ in range(megabytes * 2**20 // len(line)):
            f.write(line)
    before = peak = rss_kb(api_pid)
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
    return uploaded.bytes, before, peak


def verdict(busy: float, idle: float, forward_s: float) -> str:
    limit = 1.5 * idle + forward_s
    return f"goal <= 1.5*idle + one forward = {limit * 1e3:.1f} ms -> " + (
        "met" if busy <= limit else "missed"
    )


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
    parser.add_argument("--open-batches", type=int, default=40)
    parser.add_argument("--upload-mb", type=int, default=200)
    args = parser.parse_args()

    inputs = texts(args.lines)
    print(f"raw model: {args.lines} inputs at batch {args.batch_size} ...", flush=True)
    raw_rate, forward_s = raw_throughput(inputs, args.batch_size)
    print(
        f"  raw throughput        {raw_rate:8.1f} inputs/s  (one forward {forward_s * 1e3:.0f} ms)"
    )
    with tempfile.TemporaryDirectory(prefix="laneway-bench-") as tmp:
        root = Path(tmp)
        stack = BenchStack(
            root,
            LANEWAY_MAX_FILE_BYTES=str(600 * 2**20),
            LANEWAY_MAX_BATCH_INPUT_BYTES=str(600 * 2**20),
        )
        try:
            client = OpenAI(base_url=f"{stack.base}/v1", api_key="bench", max_retries=0)
            live_p50(client, 20, "warmup")
            idle = live_p50(client, args.probes, "idle")
            print(f"live p50 idle           {idle * 1e3:8.1f} ms", flush=True)

            _, elapsed, one = run_batches(client, stack.base, [jsonl(inputs)])
            e2e_rate = args.lines / elapsed
            print(f"  {args.lines}-line batch e2e {e2e_rate:8.1f} inputs/s  ({elapsed:.1f} s)")
            print(f"  ratio batch/raw       {e2e_rate / raw_rate:8.2f}   (goal >= 0.85)")
            busy = one.stop()
            print(f"live p50 during batch   {busy * 1e3:8.1f} ms  ({len(one.samples)} probes)")
            print("  " + verdict(busy, idle, forward_s), flush=True)

            n = args.open_batches
            split = [jsonl(inputs[i::n], prefix=f"b{i}") for i in range(n)]
            batches, elapsed, many = run_batches(client, stack.base, split)
            busy_many = many.stop()
            chunks, claimed = claims(root / "laneway.db", [b.id for b in batches])
            print(
                f"{n} open batches e2e    {args.lines / elapsed:8.1f} inputs/s  ({elapsed:.1f} s)"
            )
            print(
                f"live p50 during them    {busy_many * 1e3:8.1f} ms  ({len(many.samples)} probes)"
            )
            print("  " + verdict(busy_many, idle, forward_s))
            print(f"  {chunks} chunks, {claimed} claims (goal: equal)", flush=True)

            size, before, peak = upload_growth(client, stack.api.pid, root, args.upload_mb)
        finally:
            stack.close()
    print(
        f"upload of {size / 2**20:.0f} MB: API RSS {before / 1024:.0f} MB -> peak "
        f"{peak / 1024:.0f} MB, growth {(peak - before) / 1024:.1f} MB (goal < 64 MB)"
    )


if __name__ == "__main__":
    main()
