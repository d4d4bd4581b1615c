"""A soak: mixed live embeddings, chat and speech with batches running, for ``--minutes``.
Not part of the test run. Starts its own stack (embedded redis-server, SQLite, one CPU
worker per capability: the packaged MiniLM, a tiny random chat model, the packaged
Whisper tiny.en; the API) and, every ``--sample-s`` seconds, records:

- each process's RSS (the API, each worker, redis-server);
- Redis's ``used_memory``;
- the database's rows, per table;
- the file store's size on disk.

Load, all at once: live embeddings from ``--embed-clients`` clients (distinct texts),
streamed and plain chat from two clients, one speech client, and a 300-line embeddings
batch every ``--batch-every-s`` seconds, whose outputs are downloaded. Every fifth batch
round, the inputs and outputs of the batches finished by then are made expired (their
``expires_at`` moved into the past in the database: OpenAI's shortest expiry is an hour)
and the bench checks that the reaper deleted their content by the next round.

At the end it prints, over the samples after ``--warmup-min``, each series' first and
last value and its slope per hour (least squares), absolute and as a share of its mean:
a leak shows as a steady slope; a cache or pool filling up flattens.

    ./dev bench soak [--minutes 30] [--sample-s 30] [--warmup-min 3]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(ROOT))
from _stack import MODEL, BenchStack  # noqa: E402
from batch_embeddings import jsonl, texts  # noqa: E402

from tests.chat_models import build_llama, chat_entry, write_catalog  # noqa: E402

CHAT = "bench/soak-chat"
SPEECH = "Systran/faster-whisper-tiny.en"
CLIP = ROOT / "laneway" / "assets" / "benchmark_clip.wav"
WORDS = ("soak", "steady", "memory", "leak", "slope", "hour", "minute", "worker", "queue")


@dataclass
class Counts:
    """What the load did, by kind: answers and failures (status or exception name)."""

    ok: dict[str, int] = field(default_factory=dict)
    failed: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, kind: str, outcome: str | None) -> None:
        if outcome is None:
            self.ok[kind] = self.ok.get(kind, 0) + 1
        else:
            bucket = self.failed.setdefault(kind, {})
            bucket[outcome] = bucket.get(outcome, 0) + 1


async def call(
    session: aiohttp.ClientSession, counts: Counts, kind: str, method: str, url: str, **kw: Any
) -> Any:
    """One request; its outcome counted; the body (JSON or text) when it answered 200."""
    try:
        async with session.request(method, url, **kw) as resp:
            body = await (resp.json() if resp.content_type == "application/json" else resp.text())
            counts.add(kind, None if resp.status == 200 else str(resp.status))
            return body if resp.status == 200 else None
    except (aiohttp.ClientError, TimeoutError) as exc:
        counts.add(kind, type(exc).__name__)
        return None


async def repeat(until: float, pause_s: float, one: Callable[[int], Any]) -> None:
    for i in itertools.count():
        if time.monotonic() >= until:
            return
        await one(i)
        await asyncio.sleep(pause_s)


def live_loads(
    base: str, session: aiohttp.ClientSession, counts: Counts, until: float, clients: int
) -> list[Any]:
    """The live clients: embeddings, chat (plain and streamed) and speech."""
    rng = random.Random(0)

    def embed(client: int) -> Callable[[int], Any]:
        def one(i: int) -> Any:
            text = " ".join(rng.choices(WORDS, k=12)) + f" {client}-{i}"
            body = {"model": MODEL, "input": text}
            return call(session, counts, "embeddings", "POST", f"{base}/v1/embeddings", json=body)

        return one

    def chat(stream: bool) -> Callable[[int], Any]:
        def one(i: int) -> Any:
            body = {
                "model": CHAT,
                "messages": [{"role": "user", "content": f"count {i} " * 8}],
                "max_tokens": 16,
                "stream": stream,
            }
            url = f"{base}/v1/chat/completions"
            return call(session, counts, "chat", "POST", url, json=body)

        return one

    clip = CLIP.read_bytes()

    def speech(i: int) -> Any:
        form = aiohttp.FormData()
        form.add_field("model", SPEECH)
        form.add_field("file", clip, filename="clip.wav", content_type="audio/wav")
        url = f"{base}/v1/audio/transcriptions"
        return call(session, counts, "speech", "POST", url, data=form)

    loads = [repeat(until, 0.05, embed(c)) for c in range(clients)]
    loads += [repeat(until, 0.5, chat(False)), repeat(until, 0.5, chat(True))]
    return [*loads, repeat(until, 2.0, speech)]


@dataclass
class Batches:
    """The batch rounds: created, finished, downloaded, and made expired."""

    base: str
    db: Path
    made: list[str] = field(default_factory=list)
    files: dict[str, list[str]] = field(default_factory=dict)  # batch -> its file ids
    expired: list[str] = field(default_factory=list)  # file ids made expired
    not_deleted: list[int] = field(default_factory=list)  # per check: expired files left

    async def round(self, session: aiohttp.ClientSession, counts: Counts, n: int) -> None:
        await self._collect(session, counts)
        if n % 5 == 4:
            self.not_deleted.append(self._left_undeleted())
            self._expire_finished()
        lines = [f"{t} round {n}" for t in texts(300)]
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", jsonl(lines, prefix=f"r{n}-"), filename="in.jsonl")
        made = await call(session, counts, "files", "POST", f"{self.base}/v1/files", data=form)
        if made is None:
            return
        body = {
            "input_file_id": made["id"],
            "endpoint": "/v1/embeddings",
            "completion_window": "24h",
        }
        batch = await call(session, counts, "batches", "POST", f"{self.base}/v1/batches", json=body)
        if batch is not None:
            self.made.append(batch["id"])
            self.files[batch["id"]] = [made["id"]]

    async def _collect(self, session: aiohttp.ClientSession, counts: Counts) -> None:
        """Download the outputs of the batches finished since the last round."""
        for batch_id in [b for b in self.made if len(self.files[b]) == 1]:
            url = f"{self.base}/v1/batches/{batch_id}"
            batch = await call(session, counts, "batches", "GET", url)
            if batch is None or batch["status"] != "completed":
                continue
            out = batch["output_file_id"]
            await call(session, counts, "files", "GET", f"{self.base}/v1/files/{out}/content")
            self.files[batch_id].append(out)

    def _expire_finished(self) -> None:
        done = [f for ids in self.files.values() if len(ids) == 2 for f in ids]
        fresh = [f for f in done if f not in self.expired]
        if not fresh:
            return
        with sqlite3.connect(self.db, timeout=30) as conn:
            marks = ",".join("?" * len(fresh))
            conn.execute(f"UPDATE files SET expires_at = 1 WHERE id IN ({marks})", fresh)
        self.expired += fresh

    def _left_undeleted(self) -> int:
        """The files made expired a round ago whose content the reaper has not deleted."""
        if not self.expired:
            return 0
        with sqlite3.connect(self.db, timeout=30) as conn:
            marks = ",".join("?" * len(self.expired))
            row = conn.execute(
                f"SELECT count(*) FROM files WHERE deleted = 0 AND id IN ({marks})", self.expired
            ).fetchone()
        return int(row[0])


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def tree_size_mb(path: Path) -> float:
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return total / 1024 / 1024


def sample(stack: BenchStack, store: Path, db: Path) -> dict[str, float]:
    """Every series, now."""
    out = {"rss_mb api": rss_mb(stack.api.pid), "rss_mb redis": rss_mb(stack.redis.pid)}
    for proc in stack.workers:
        out[f"rss_mb {proc.name}"] = rss_mb(proc.pid)
    info = redis.Redis.from_url(stack.env["LANEWAY_REDIS_URL"]).info("memory")
    out["redis used_memory_mb"] = int(info["used_memory"]) / 1024 / 1024
    with sqlite3.connect(db, timeout=30) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in sorted(t for t in tables if t != "alembic_version"):
            out[f"rows {table}"] = float(
                conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]
            )
    out["file_store_mb"] = tree_size_mb(store) if store.exists() else 0.0
    return out


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value), per hour."""
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    var = sum((t - mx) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    return 3600 * sum((t - mx) * (v - my) for t, v in points) / var


def report(samples: list[tuple[float, dict[str, float]]], warmup_s: float) -> None:
    """First and last value and slope per hour of each series after the warm-up, and the
    slope over the second half alone: a cache or pool filling up flattens there, a leak
    does not."""
    kept = [(t, s) for t, s in samples if t >= warmup_s] or samples
    half = kept[len(kept) // 2 :]
    print(f"\n{len(kept)} samples from {kept[0][0] / 60:.1f} to {kept[-1][0] / 60:.1f} min")
    head = f"{'series':<34} {'first':>10} {'last':>10} {'slope/h':>10} {'% of mean/h':>12}"
    print(f"{head} {'2nd half/h':>11}")
    for name in kept[-1][1]:
        points = [(t, s[name]) for t, s in kept if name in s]
        late = [(t, s[name]) for t, s in half if name in s]
        slope = slope_per_hour(points) if len(points) > 1 else 0.0
        slope_late = slope_per_hour(late) if len(late) > 1 else 0.0
        mean = sum(v for _, v in points) / len(points)
        share = f"{100 * slope / mean:+.1f}" if mean else "-"
        first, last = points[0][1], points[-1][1]
        print(
            f"{name:<34} {first:>10.1f} {last:>10.1f} {slope:>+10.2f} {share:>12} "
            f"{slope_late:>+11.2f}"
        )


async def drive(stack: BenchStack, args: argparse.Namespace, root: Path) -> None:
    db, store = root / "laneway.db", root / "files"
    counts, batches = Counts(), Batches(stack.base, db)
    began = time.monotonic()
    until = began + args.minutes * 60
    samples: list[tuple[float, dict[str, float]]] = []

    async def sampler() -> None:
        while time.monotonic() < until:
            samples.append(
                (time.monotonic() - began, await asyncio.to_thread(sample, stack, store, db))
            )
            await asyncio.sleep(args.sample_s)

    async def batch_rounds() -> None:
        for n in itertools.count():
            if time.monotonic() >= until:
                return
            await batches.round(session, counts, n)
            await asyncio.sleep(args.batch_every_s)

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        loads = live_loads(stack.base, session, counts, until, args.embed_clients)
        await asyncio.gather(sampler(), batch_rounds(), *loads)
    report(samples, args.warmup_min * 60)
    print(f"\nanswered: {counts.ok}")
    print(f"failed:   {counts.failed or 'none'}")
    print(f"batches created: {len(batches.made)}; expired files: {len(batches.expired)}")
    print(f"expired files not yet deleted, five rounds after they expired: {batches.not_deleted}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--sample-s", type=float, default=30.0)
    parser.add_argument("--warmup-min", type=float, default=3.0)
    parser.add_argument("--batch-every-s", type=float, default=60.0)
    parser.add_argument("--embed-clients", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="laneway-soak-") as tmp:
        root = Path(tmp)
        model = build_llama(root / "models", eos=False, name="soak-chat")
        catalog = write_catalog(root / "catalog.yaml", [chat_entry(CHAT, model)])
        stack = BenchStack(
            root / "stack",
            more_capabilities=("chat", "audio"),
            LANEWAY_MODELS=f"{MODEL},{CHAT},{SPEECH}",
            LANEWAY_MODEL_CONFIG=str(catalog),
            LANEWAY_REAPER_INTERVAL_S="5",
            HF_HUB_OFFLINE="1",
        )
        try:
            print(
                f"soak: {args.minutes:g} min; pids {stack.roles()}, "
                f"workers {[w.pid for w in stack.workers]}"
            )
            asyncio.run(drive(stack, args, root / "stack"))
        finally:
            stack.close()
    os.sync()


if __name__ == "__main__":
    main()
