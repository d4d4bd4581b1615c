"""Rerank and classify on one device: a prepared check for a CUDA machine (it also runs
on CPU).

Not part of the test run. Builds a random-weight BERT cross-encoder and a 3-class
classifier at run time (tests/sequence_models.py, over the packaged MiniLM tokenizer) in
a temporary directory, loads each through laneway's scoring engine on ``--device``
straight from a catalog entry (no stack, no Redis), and for each:

a. parity: ``--pairs`` (query, document) pairs of mixed lengths, submitted to the engine
   as one live request, against sentence-transformers' ``CrossEncoder.predict`` (rerank)
   or transformers' ``pipeline("text-classification", top_k=None)`` (classify) on the same
   device in float32: max abs difference under 1e-5 in float32, 1e-2 in ``--dtype``;
b. throughput: the same inputs as ``--requests`` batch-lane requests at once, after a
   warm-up: inputs/s, and the engine's forwards and their mean batch size.

One summary line per capability ends the output; the exit status is 1 when a check failed.

    .venv/bin/python bench/gpu_scoring.py [--device cuda:0|cpu] [--dtype float16]
        [--pairs 256] [--requests 16] [--layers 12 --hidden 384 --heads 12 --intermediate 1536]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.settings import Settings
from tasks.queue.names import BATCH, LIVE
from tests.sequence_models import (
    build_classifier,
    build_cross_encoder,
    loaded,
    pipeline_probs,
)
from workers.backends.classify import ClassifierBackend
from workers.backends.rerank import CrossEncoderBackend
from workers.scoring import ScoringEngine

WORDS = ["the", "quick", "fox", "jumps", "over", "a", "lazy", "dog", "in", "paris"]


def texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(4, 120)))) for _ in range(n)]


def reference(capability: str, path: Path, device: str, queries: list[str], docs: list[str]) -> Any:
    if capability == "rerank":
        from sentence_transformers import CrossEncoder

        return np.asarray(
            CrossEncoder(str(path), device=device).predict(list(zip(queries, docs, strict=True)))
        )
    return pipeline_probs(path, docs, device=device)


def run(capability: str, path: Path, args: argparse.Namespace, dtype: str) -> tuple[float, float]:
    """(max abs difference against the reference, inputs/s on the batch lane)."""
    kind = CrossEncoderBackend if capability == "rerank" else ClassifierBackend
    backend = loaded(
        kind,
        capability,
        path,
        device=args.device,
        dtype=dtype,
        max_input_tokens=512,
        batch_token_budget=args.budget,
    )
    engine = ScoringEngine(backend, Settings())
    query = "where does the fox sleep"
    docs = texts(args.pairs, 1)

    def jobs(n: int) -> list[list[list[int]]]:
        one = backend.pairs(query, docs) if capability == "rerank" else backend.texts(docs)
        return [one] * n

    [live] = engine.run_many(jobs(1), lane=LIVE)
    assert not isinstance(live, BaseException), live
    ours = np.stack(live.rows)
    ref = reference(capability, path, args.device, [query] * len(docs), docs)
    diff = float(np.abs(ours - ref).max())
    engine.run_many(jobs(2), lane=BATCH)  # warm-up
    before, started = engine.metrics()["forwards"], time.perf_counter()
    results = engine.run_many(jobs(args.requests), lane=BATCH)
    seconds = time.perf_counter() - started
    assert not any(isinstance(r, BaseException) for r in results), results
    forwards = engine.metrics()["forwards"] - before
    engine.stop()
    rate = args.requests * len(docs) / seconds
    per_forward = args.requests * len(docs) / max(forwards, 1)
    print(f"{capability} {dtype}: {forwards} forwards, {per_forward:.1f} inputs each")
    return diff, rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--budget", type=int, default=65536)
    for name, default in (("layers", 12), ("hidden", 384), ("heads", 12), ("intermediate", 1536)):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()
    size = {k: getattr(args, k) for k in ("layers", "hidden", "heads", "intermediate")}
    dtypes = ["float32"] + (
        [args.dtype] if args.dtype != "float32" and args.device != "cpu" else []
    )
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        paths = {
            "rerank": build_cross_encoder(Path(tmp), size=size),
            "classify": build_classifier(Path(tmp), size=size),
        }
        for capability, path in paths.items():
            for dtype in dtypes:
                diff, rate = run(capability, path, args, dtype)
                ok = diff < (1e-5 if dtype == "float32" else 1e-2)
                failed |= not ok
                print(
                    f"SUMMARY {capability} device={args.device} dtype={dtype} "
                    f"max_abs_diff={diff:.2e} parity={'ok' if ok else 'FAILED'} "
                    f"inputs_per_s={rate:.0f}"
                )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
