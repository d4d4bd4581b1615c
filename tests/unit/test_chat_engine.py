"""workers.chat_engine.ChatEngine over a fake chat backend whose "KV cache" holds the
token ids themselves: the next token is a function of the whole sequence, so a row that
the cache surgery (merge, select, trim) mixed up gives a wrong continuation."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import DynamicCache

from configs.catalog import load_catalog
from configs.settings import Settings
from tasks.errors import ContextLengthExceeded
from tasks.names import BATCH, LIVE
from tests.chat_models import chat_entry, write_catalog
from workers.backends.chat import Batch, ChatBackend, OutOfMemory, Prompt
from workers.batching import Dropped, JobMeta
from workers.chat_engine import ChatEngine, ChatResult

pytestmark = pytest.mark.timeout(30)

VOCAB = 64
EOS = 1


class FakeChat(ChatBackend):
    def __init__(self, tmp: Path, **defaults: Any) -> None:
        catalog = write_catalog(tmp / "c.yaml", [chat_entry("fake/chat", tmp, **defaults)])
        super().__init__(load_catalog(catalog).get("fake/chat"), device="cpu", model_path="/")
        self.eos_ids = frozenset()
        self.vocab_size = VOCAB
        self.prefills: list[list[list[int]]] = []
        self.decodes: list[int] = []
        self.ooms = 0
        self.oom_over: int | None = None  # decode raises OutOfMemory above this many rows
        self.gate = threading.Event()
        self.gate.set()
        self.delay_s = 0.0  # per decode step

    def load(self) -> None:
        self.warm = True

    def warmup(self) -> None:
        self.warm = True

    def render(self, messages: Sequence[dict[str, Any]], images: Sequence[bytes]) -> Prompt:
        text = " ".join(str(m["content"]) for m in messages)
        return Prompt([ord(c) % (VOCAB - 2) + 2 for c in text])

    def _logits(self, cache: DynamicCache, mask: torch.Tensor) -> torch.Tensor:
        keys = cache.layers[0].keys[:, 0, :, 0]  # type: ignore[union-attr]
        weights = torch.arange(1, keys.shape[1] + 1, dtype=keys.dtype)
        # position-weighted over real tokens only: padding must not count
        score = ((keys * mask) * weights.flip(0)).sum(dim=1).long()
        nxt = score % (VOCAB - 2) + 2
        logits = torch.full((keys.shape[0], VOCAB), -10.0)
        logits[torch.arange(keys.shape[0]), nxt] = 10.0
        return logits

    def prefill(self, prompts: Sequence[Prompt]) -> tuple[torch.Tensor, Batch]:
        self.prefills.append([p.ids for p in prompts])
        width = max(len(p.ids) for p in prompts)
        keys = torch.zeros((len(prompts), 1, width, 1))
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            keys[row, 0, width - len(p.ids) :, 0] = torch.tensor(p.ids, dtype=torch.float)
            mask[row, width - len(p.ids) :] = 1
        cache = DynamicCache()
        cache.update(keys, keys.clone(), 0)
        return self._logits(cache, mask), Batch(cache, mask, torch.zeros(len(prompts)))

    def decode(self, batch: Batch, tokens: torch.Tensor) -> torch.Tensor:
        self.gate.wait(10)
        time.sleep(self.delay_s)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((batch.rows, 1))], dim=1)
        if self.oom_over is not None and batch.rows > self.oom_over:
            self.ooms += 1
            raise OutOfMemory("simulated")
        self.decodes.append(batch.rows)
        new = tokens.to(torch.float).view(-1, 1, 1, 1)
        batch.cache.update(new, new.clone(), 0)
        return self._logits(batch.cache, batch.mask)

    def text(self, ids: Sequence[int]) -> str:
        return "".join(f"w{i} " for i in ids if i not in self.eos_ids)

    def token_text(self, token: int) -> str:
        return f"w{token} "


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Any]:
    engines: list[ChatEngine] = []

    def build(**defaults: Any) -> tuple[ChatEngine, FakeChat]:
        backend = FakeChat(tmp_path, **defaults)
        engine = ChatEngine(backend, Settings(redis_url="redis://x", chat_oom_cooldown_s=60))
        engines.append(engine)
        return engine, backend

    yield build
    for engine in engines:
        engine.backend.gate.set()  # type: ignore[attr-defined]
        engine.stop()


def work(text: str, max_tokens: int = 8, **kw: Any) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        **kw,
    }


def alone(engine: ChatEngine, text: str, max_tokens: int) -> str:
    return str(engine.submit(work(text, max_tokens)).result(10).choices[0]["text"])


def test_sequences_that_join_and_leave_keep_their_own_continuation(make: Any) -> None:
    engine, _ = make(max_running=8)
    texts = ["a", "bbbbbbbbbbbbbbbb", "cc", "dddddd", "e" * 30]
    expected = [alone(engine, t, 5 + 3 * i) for i, t in enumerate(texts)]
    futures = [engine.submit(work(t, 5 + 3 * i)) for i, t in enumerate(texts)]
    got = [f.result(10).choices[0]["text"] for f in futures]
    assert got == expected


def test_live_jobs_are_admitted_before_waiting_batch_jobs(make: Any) -> None:
    engine, backend = make(max_running=2)
    backend.gate.clear()  # the first decode step waits
    first = engine.submit(work("running batch job", 30), lane=BATCH)
    while not backend.prefills:
        threading.Event().wait(0.01)
    batch_jobs = [engine.submit(work(f"batch {i}", 3), lane=BATCH) for i in range(3)]
    live_jobs = [engine.submit(work(f"live {i}", 3), lane=LIVE) for i in range(3)]
    backend.gate.set()
    for f in [first, *batch_jobs, *live_jobs]:
        f.result(10)
    order = [ids for call in backend.prefills[1:] for ids in call]
    rendered = {
        tuple(backend.render([{"content": t}], []).ids): t
        for t in [*(f"batch {i}" for i in range(3)), *(f"live {i}" for i in range(3))]
    }
    # (a preempted batch job comes back with what it had generated: not a name here)
    names = [rendered[tuple(ids)] for ids in order if tuple(ids) in rendered]
    assert names[:3] == ["live 0", "live 1", "live 2"], names


def test_out_of_memory_halves_the_batch_and_fails_nothing(make: Any) -> None:
    engine, backend = make(max_running=8)
    texts = [f"request {i} " * (i + 1) for i in range(6)]
    expected = [alone(engine, t, 12) for t in texts]
    backend.oom_over = 3
    backend.gate.clear()
    futures = [engine.submit(work(t, 12)) for t in texts]
    backend.gate.set()
    got = [f.result(10).choices[0]["text"] for f in futures]
    assert got == expected
    assert backend.ooms >= 1 and max(backend.decodes) <= 3
    assert engine._cap <= 3 and engine._cap_until > 0  # kept for the cooldown


def test_a_departed_caller_is_dropped_and_frees_its_rows(make: Any) -> None:
    engine, backend = make(max_running=1)
    backend.delay_s = 0.01  # the long job would hold the one slot for 4 s
    gone: set[str] = set()
    engine.gone = lambda ids: {i for i in ids if i in gone}
    long = engine.submit(work("long one", 400), meta=JobMeta("r-long"))
    while not backend.decodes:
        threading.Event().wait(0.01)
    steps = len(backend.decodes)
    gone.add("r-long")
    short = engine.submit(work("short", 3), meta=JobMeta("r-short"))
    assert len(short.result(5).choices[0]["text"].split()) == 3
    # counted in decode steps, not seconds: the gone check (every 0.05 s, each step
    # sleeps 0.01 s) and the short job's own steps; the long job has ~400 left
    assert len(backend.decodes) - steps < 40, backend.decodes
    with pytest.raises(Dropped):
        long.result(5)


def test_streamed_text_holds_back_a_possible_stop_string(make: Any) -> None:
    engine, _ = make(max_running=4)
    text = alone(engine, "stream me", 12)
    stop = text.split()[5]
    events: list[list[dict[str, Any]]] = []
    result = engine.submit(work("stream me", 12, stop=[stop]), emit=events.append).result(10)
    streamed = "".join(c["text"] for e in events for c in e)
    assert streamed == result.choices[0]["text"] == text[: text.index(stop)]
    assert events[-1][0]["finish_reason"] == "stop"
    assert all("finish_reason" not in c for e in events[:-1] for c in e)


def test_prompt_over_the_context_fails_before_compute(make: Any) -> None:
    engine, backend = make(max_input_tokens=64)
    future: Future[ChatResult] = engine.submit(work("x" * 60, 10))
    with pytest.raises(ContextLengthExceeded, match="64"):
        future.result(5)
    assert backend.prefills == []


def test_a_live_job_preempts_batch_jobs_that_hold_every_slot(make: Any) -> None:
    """Both slots run 150-token batch jobs (1.5 s); a live job must not wait for them: it
    takes the newest one's slot, which resumes later with the same continuation."""
    engine, backend = make(max_running=2)
    texts = ["batch job one", "batch job two"]
    expected = [alone(engine, t, 150) for t in texts]
    backend.delay_s = 0.01
    finished: list[str] = []  # in the scheduler's order, not as this thread sees it
    batch = [engine.submit(work(t, 150), lane=BATCH) for t in texts]
    for f in batch:
        f.add_done_callback(lambda _: finished.append("batch"))
    while len(backend.decodes) < 5 or backend.decodes[-1] < 2:
        time.sleep(0.01)
    live = engine.submit(work("live", 3), lane=LIVE)
    live.add_done_callback(lambda _: finished.append("live"))
    assert len(live.result(5).choices[0]["text"].split()) == 3
    assert [f.result(10).choices[0]["text"] for f in batch] == expected
    # a live job that waited for a slot would finish after a batch job, ~145 steps later
    assert finished == ["live", "batch", "batch"]
    assert engine.preempted >= 1


def test_one_request_that_does_not_fit_alone_fails_instead_of_hanging(make: Any) -> None:
    """Out of memory with a single request running (its n=3 choices): no other request
    can make room, so it fails (before, half of its choices were dropped: a hang)."""
    engine, backend = make(max_running=8)
    backend.oom_over = 1
    with pytest.raises(OutOfMemory):
        engine.submit(work("three choices", 5, n=3)).result(5)
    backend.oom_over = None
    assert len(engine.submit(work("next", 3)).result(5).choices[0]["text"].split()) == 3
