"""workers.chat_engine.ChatEngine over a fake chat backend whose "KV cache" holds the
token ids themselves: the next token is a function of the whole sequence, so a row that
the cache surgery (merge, select, trim) mixed up gives a wrong continuation. The
sampling on the device (``_pick``) is also tested on its own, on the 'meta' device."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import DynamicCache

from configs.catalog import load_catalog
from configs.settings import Settings
from tasks.errors import ContextLengthExceeded
from tasks.queue.names import BATCH, LIVE
from tests.chat_models import chat_entry, write_catalog
from workers.backends.chat import Batch, ChatBackend, OutOfMemory, Prompt
from workers.chat_engine import (
    ChatEngine,
    ChatJob,
    ChatResult,
    Choice,
    Sampling,
    Submission,
)
from workers.chat_sampling import _top_p
from workers.chat_sampling import pick as _pick
from workers.jobs import Dropped, JobMeta

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
        self.soft = False  # broad logits (sampling, penalties and top-p all matter)

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
        if self.soft:  # every token possible, the likeliest some 20 times the least
            spread = torch.arange(VOCAB)[None, :] * (nxt[:, None] % 7 + 1) + nxt[:, None]
            return (spread % 13).float() / 4.0
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
        cache = self._new_cache()
        self._append(cache, keys, "prefill")
        return self._logits(cache, mask), Batch(cache, mask, torch.zeros(len(prompts)))

    def decode(self, batch: Batch, tokens: torch.Tensor) -> torch.Tensor:
        """As ``ChatBackend.decode`` says: the mask gets its column only on success."""
        self.gate.wait(10)
        time.sleep(self.delay_s)
        if self.oom_over is not None and batch.rows > self.oom_over:
            self.ooms += 1
            raise OutOfMemory("simulated")
        new = tokens.to(torch.float).view(-1, 1, 1, 1)
        self._append(batch.cache, new, "decode")
        self.decodes.append(batch.rows)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((batch.rows, 1))], dim=1)
        return self._logits(batch.cache, batch.mask)

    def _new_cache(self) -> DynamicCache:
        return DynamicCache()

    def _append(self, cache: DynamicCache, keys: torch.Tensor, phase: str) -> None:
        """``keys`` (and as many values) appended to the cache, as a forward's layers do."""
        cache.update(keys, keys.clone(), 0)

    def text(self, ids: Sequence[int]) -> str:
        return "".join(f"w{i} " for i in ids if i not in self.eos_ids)

    def token_text(self, token: int) -> str:
        return f"w{token} "


def engines_on(tmp_path: Path, fake: type[FakeChat]) -> Iterator[Any]:
    """A fixture's body: ``build(**defaults)`` makes an engine on a ``fake`` backend;
    every engine built is released and stopped afterwards."""
    engines: list[ChatEngine] = []

    def build(**defaults: Any) -> tuple[ChatEngine, Any]:
        backend = fake(tmp_path, **defaults)
        engine = ChatEngine(backend, Settings(redis_url="redis://x", chat_oom_cooldown_s=60))
        engines.append(engine)
        return engine, backend

    yield build
    for engine in engines:
        engine.backend.gate.set()  # type: ignore[attr-defined]
        engine.stop()


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Any]:
    yield from engines_on(tmp_path, FakeChat)


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


def test_a_failing_gone_look_up_does_not_stop_the_engine(make: Any) -> None:
    engine, _ = make(max_running=2)

    def broken(ids: list[str]) -> set[str]:
        raise ConnectionError("redis is away")

    engine.gone = broken
    meta = JobMeta("r-1", None, time.time() - 1)
    assert len(engine.submit(work("one", 6), meta=meta).result(5).choices[0]["text"].split()) == 6
    late = engine.submit(work("late", 6), meta=JobMeta("r-2", time.time() - 1, time.time() - 1))
    with pytest.raises(Dropped):  # the deadline still counts without Redis
        late.result(5)
    assert engine._thread.is_alive()


def test_a_future_failed_outside_frees_its_rows(make: Any) -> None:
    """A chunk's timeout fails a batch job's future: its sequences stop being decoded."""
    engine, backend = make(max_running=1)
    backend.delay_s = 0.01  # the long job would hold the one slot for 4 s
    long = engine.submit(work("long one", 400), lane=BATCH)
    while not backend.decodes:
        threading.Event().wait(0.01)
    long.set_exception(TimeoutError("the chunk timed out"))
    steps = len(backend.decodes)
    short = engine.submit(work("short", 3), lane=BATCH)
    assert len(short.result(5).choices[0]["text"].split()) == 3
    assert len(backend.decodes) - steps < 40, backend.decodes


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
    engine, backend = make(max_running=2, live_reserve=0)
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


def test_batch_jobs_leave_the_live_reserve_free_so_live_work_preempts_nothing(
    make: Any,
) -> None:
    """Four slots, one kept for live work: three batch jobs run, the fourth waits, and a
    live job starts at once in the free slot without throwing any batch work away."""
    engine, backend = make(max_running=4, live_reserve=1)
    backend.delay_s = 0.01
    batch = [engine.submit(work(f"batch job {i}", 60), lane=BATCH) for i in range(4)]
    while len(backend.decodes) < 3:
        time.sleep(0.01)
    assert max(backend.decodes) == 3
    live = engine.submit(work("live", 3), lane=LIVE)
    assert len(live.result(5).choices[0]["text"].split()) == 3
    assert not any(f.done() for f in batch)  # the live job did not wait for them
    assert all(f.result(20).completion_tokens == 60 for f in batch)
    assert engine.preempted == 0
    assert max(backend.decodes) == 4  # three batch rows and the live one, never more


def test_a_live_job_is_prefilled_without_batch_jobs_beside_it(make: Any) -> None:
    """A live job and batch jobs that could all start in the same turn: the live job's
    prefill holds it alone (batch prompts beside it would delay its first token), and the
    batch jobs start in a later one."""
    engine, backend = make(max_running=8, live_reserve=1)
    backend.gate.clear()  # the running job's first decode step waits
    first = engine.submit(work("running", 4), lane=BATCH)
    while not backend.prefills:
        time.sleep(0.01)
    batch = [engine.submit(work(f"batch {i}", 3), lane=BATCH) for i in range(3)]
    live = engine.submit(work("live one", 3), lane=LIVE)
    backend.gate.set()
    for f in [first, *batch, live]:
        f.result(10)
    live_ids = backend.render([{"content": "live one"}], []).ids
    [with_live] = [call for call in backend.prefills if live_ids in call]
    assert with_live == [live_ids], with_live


def test_a_new_sequence_streams_its_first_token_before_its_cache_is_merged(
    make: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Merging copies the whole running cache: a live job that joins a running batch gets
    its first token out first, and its continuation is still its own."""
    import workers.chat_engine as chat_engine

    engine, backend = make(max_running=8)
    expected = alone(engine, "live one", 4)
    events: list[str] = []
    real_merge = chat_engine.merge

    def merge(a: Any, b: Any) -> Any:
        events.append("merge")
        return real_merge(a, b)

    monkeypatch.setattr(chat_engine, "merge", merge)
    backend.delay_s = 0.01
    running = engine.submit(work("running batch job", 40), lane=BATCH)
    while len(backend.decodes) < 3:
        time.sleep(0.01)
    events.clear()

    def emit(deltas: list[dict[str, Any]]) -> None:
        if any(d.get("text") for d in deltas):
            events.append("token")

    [live] = engine.submit_many([Submission(work("live one", 4), emit=emit)], lane=LIVE)
    assert live.result(10).choices[0]["text"] == expected
    assert events[:2] == ["token", "merge"], events
    assert running.result(10).completion_tokens == 40


def test_batch_prefills_hold_at_most_batch_prefill_tokens_per_step(make: Any) -> None:
    """Eight 20-token batch prompts with a 50-token prefill budget: they start two at a
    time, a decode step between, and all finish as they would have at once."""
    engine, backend = make(max_running=16, batch_prefill_tokens=50)
    texts = [f"batch prompt {i:02d} abcdef" for i in range(8)]
    assert {len(backend.render([{"content": t}], []).ids) for t in texts} == {22}
    expected = [alone(engine, t, 6) for t in texts]
    backend.prefills.clear()
    backend.gate.clear()
    futures = [engine.submit(work(t, 6), lane=BATCH) for t in texts]
    backend.gate.set()
    assert [f.result(10).choices[0]["text"] for f in futures] == expected
    sizes = [len(call) for call in backend.prefills]
    assert sum(sizes) == 8 and max(sizes) <= 2, sizes
    # a single job over the budget still starts (alone)
    backend.prefills.clear()
    long_text = "x" * 80
    assert engine.submit(work(long_text, 2), lane=BATCH).result(10).completion_tokens == 2
    assert [len(call) for call in backend.prefills] == [1]


def test_one_request_that_does_not_fit_alone_fails_instead_of_hanging(make: Any) -> None:
    """Out of memory with a single request running (its n=3 choices): no other request
    can make room, so it fails (before, half of its choices were dropped: a hang)."""
    engine, backend = make(max_running=8)
    backend.oom_over = 1
    with pytest.raises(OutOfMemory):
        engine.submit(work("three choices", 5, n=3)).result(5)
    backend.oom_over = None
    assert len(engine.submit(work("next", 3)).result(5).choices[0]["text"].split()) == 3


# -- sampling -------------------------------------------------------------------------------


def texts(result: ChatResult) -> list[str]:
    return [str(c["text"]) for c in result.choices]


def test_seeded_sampling_does_not_depend_on_the_batch_or_the_engine(make: Any) -> None:
    """A seeded request (temperature 1, top-p, penalties, n=2) gives the same tokens
    alone, batched with other sampled, seeded, greedy and penalised requests (which
    finish at other steps, so its rows move in the batch), and on another engine."""
    first, backend = make(max_running=16)
    second, other = make(max_running=16)
    backend.soft = other.soft = True
    seeded = work(
        "seeded sampling",
        20,
        temperature=1.0,
        top_p=0.9,
        seed=1234,
        n=2,
        frequency_penalty=0.5,
        presence_penalty=0.3,
    )
    alone = texts(first.submit(seeded).result(10))
    company = [
        work("greedy", 12),
        work("unseeded", 15, temperature=0.8),
        seeded,
        work("other seed", 9, temperature=1.2, seed=7, presence_penalty=1.0, logprobs=True),
        work("penalised greedy", 25, frequency_penalty=2.0, top_logprobs=3, logprobs=True),
    ]
    futures = first.submit_many([Submission(w) for w in company])
    assert texts(futures[2].result(10)) == alone
    assert all(f.result(10) for f in futures)
    assert len(backend.prefills[-1]) == 6  # all of them in one batch
    assert texts(second.submit(seeded).result(10)) == alone
    assert alone[0] != alone[1]  # the two choices drew their own tokens


def _row(sampling: Sampling, generated: Sequence[int] = (), n: int = 1) -> list[Choice]:
    job = ChatJob(sampling, Prompt([2, 3]), LIVE, JobMeta())
    job.choices = [Choice(job, i, generated=list(generated)) for i in range(n)]
    return job.choices


class OneDevice(TorchDispatchMode):
    """Records every op whose tensors are not all on one device: the only mix allowed is
    an explicit copy of host values onto ``device`` (and a 0-dim scalar)."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.mixed: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        found = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        devices = {t.device for t in found if t.dim() > 0}
        copy_in = func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default) and (
            isinstance(out, torch.Tensor) and out.device == self.device
        )
        if len(devices) > 1 and not copy_in:
            self.mixed.append(f"{func}: {sorted(map(str, devices))}")
        generator = kwargs.get("generator")
        if generator is not None and generator.device != self.device:
            self.mixed.append(f"{func}: generator on {generator.device}")
        return out


def test_sampling_stays_on_the_logits_device_and_reads_nothing_back() -> None:
    """``_pick`` on 'meta' logits: every op's tensors on that device (a CPU tensor in a
    penalty, a CPU generator, ... is recorded) and no value read back (on 'meta' that
    raises), with greedy, penalised, top-p, seeded (n=2), unseeded and logprob rows."""
    meta = torch.device("meta")
    rows = [
        *_row(Sampling(8, temperature=0.0, frequency_penalty=0.5), [4, 4, 9]),
        *_row(Sampling(8, top_p=0.5, presence_penalty=0.2, logprobs=True, top_logprobs=3)),
        *_row(Sampling(8, temperature=0.7, seed=3), [5], n=2),
        *_row(Sampling(8, temperature=1.3, logprobs=True)),
    ]
    asked: list[torch.device] = []

    def generator(job: ChatJob, device: torch.device) -> torch.Generator | None:
        asked.append(device)
        return None  # no generator lives on 'meta': the default one draws

    logits = torch.empty((len(rows), VOCAB), device=meta)
    with OneDevice(meta) as guard:
        picked = _pick(logits, rows, generator)
    assert guard.mixed == []
    assert asked and set(asked) == {meta}
    assert picked.want == [1, 4]
    for t in (picked.tokens, picked.chosen, picked.top_values, picked.top_ids):
        assert t is not None and t.device == meta
    assert picked.top_values is not None and picked.top_values.shape == (2, 3)
    assert all(rows[i].counts is not None and rows[i].counts.device == meta for i in (0, 1))


def test_penalties_temperature_top_p_and_logprobs_keep_their_meaning() -> None:
    """Penalties on generated tokens only (frequency x count + presence x (count > 0)),
    greedy at temperature 0, top-p the smallest set of that mass, log-probabilities of
    the raw logits; and the penalised rows' counts follow the tokens picked."""
    logits = torch.zeros((5, VOCAB))
    logits[:, 5], logits[:, 6] = 3.0, 2.5
    rows = [
        *_row(Sampling(4, temperature=0.0, frequency_penalty=0.3), [5, 5]),  # 3 - 0.6 < 2.5
        *_row(Sampling(4, temperature=0.0, presence_penalty=0.4), [5]),  # 3 - 0.4 > 2.5
        *_row(Sampling(4, temperature=0.0), [5, 5, 5]),  # no penalty: 5
        *_row(Sampling(4, temperature=1.0, top_p=0.01, seed=1)),  # only 5 is in the set
        *_row(
            Sampling(4, temperature=0.0, frequency_penalty=9.0, logprobs=True, top_logprobs=2),
            [5],
        ),
    ]
    engine_like = torch.Generator().manual_seed(0)
    picked = _pick(logits, rows, lambda job, device: engine_like)
    assert picked.tokens.tolist() == [6, 5, 5, 5, 6]
    raw = torch.log_softmax(logits[4], dim=-1)
    assert picked.chosen is not None and picked.chosen.tolist() == [float(raw[6])]
    assert picked.top_ids is not None and picked.top_ids.tolist() == [[5, 6]]
    assert picked.top_values is not None
    assert picked.top_values.tolist() == [[float(raw[5]), float(raw[6])]]
    counts = rows[0].counts
    assert counts is not None and (counts[5], counts[6], counts.sum()) == (2, 1, 3)
    assert rows[2].counts is None  # not penalised: nothing kept
    # top-p: 0.4 < 0.5, so the next token joins the set; the rest drop out
    probs = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.1, 0.4, 0.2, 0.3]])
    kept = _top_p(probs, torch.tensor([[0.5], [float("inf")]]))
    assert torch.equal(kept, torch.tensor([[0.0, 0.4, 0.0, 0.3], [0.1, 0.4, 0.2, 0.3]]))


def test_logprobs_come_back_with_the_tokens(make: Any) -> None:
    engine, _ = make()
    result = engine.submit(work("log me", 4, logprobs=True, top_logprobs=3)).result(10)
    entries = result.choices[0]["logprobs"]
    assert len(entries) == 4 and "".join(e["token"] for e in entries) == result.choices[0]["text"]
    for e in entries:  # greedy over one-hot logits: the chosen token is the top one
        assert len(e["top_logprobs"]) == 3 and e["top_logprobs"][0]["token"] == e["token"]
        assert e["logprob"] == e["top_logprobs"][0]["logprob"]


def test_generators_are_made_on_the_backend_device(make: Any) -> None:
    """Made from the logits' device at the first draw (a CPU generator cannot drive a
    CUDA draw); a seeded request keeps its own, the unseeded share the engine's."""
    engine, backend = make()
    device = torch.device(backend.device)
    logits_device = torch.zeros(1, device=backend.device).device
    seeded, unseeded, also = (
        engine._job(work("x", 2, **kw), (), LIVE, JobMeta(), None)
        for kw in ({"temperature": 1.0, "seed": 5}, {"temperature": 1.0}, {"temperature": 0.5})
    )
    generator = engine._generator(seeded, logits_device)
    assert generator.device == device and generator is seeded.generator
    assert engine._generator(seeded, logits_device) is generator
    shared = engine._generator(unseeded, logits_device)
    assert shared.device == device and shared is engine._generator(also, logits_device)
    assert shared is not generator
    again = torch.Generator(device=device).manual_seed(5)
    assert torch.equal(torch.rand(4, generator=generator), torch.rand(4, generator=again))


# -- admission ------------------------------------------------------------------------------


def test_admission_counts_every_row_as_wide_as_the_widest(make: Any) -> None:
    """Budget 512: the rows' own widths add up to 208 + 6 x 15 = 298, but the cache is
    left-padded, so seven rows cost 7 x 208; the long job starts with one short one."""
    engine, backend = make(max_running=16, max_input_tokens=512, batch_token_budget=64)
    assert engine.token_budget == 512
    jobs = [work("x" * 200, 8), *(work(f"short {i}", 8) for i in range(6))]
    expected = [alone(engine, str(w["messages"][0]["content"]), 8) for w in jobs]
    before = len(backend.prefills)
    futures = engine.submit_many([Submission(w) for w in jobs])
    assert [f.result(10).choices[0]["text"] for f in futures] == expected
    sizes = [len(call) for call in backend.prefills[before:]]
    assert sizes[0] == 2 and sum(sizes) == 7, sizes  # 2 x 208 fits, 3 x 208 does not


def test_a_live_job_that_would_not_fit_anyway_preempts_nothing(make: Any) -> None:
    """Budget 600. Running: a live job (150 wide) and two batch jobs (100 wide): 3 x 150.
    A live job 310 wide does not fit beside the running live one (2 x 310), whatever is
    preempted: so no batch job is, they run to the end, and the live job waits."""
    engine, backend = make(max_running=8, max_input_tokens=600, batch_token_budget=64)
    batch_texts = ["batch one", "batch two"]
    expected = [alone(engine, t, 91) for t in batch_texts]
    backend.gate.clear()
    batch = engine.submit_many([Submission(work(t, 91)) for t in batch_texts], lane=BATCH)
    while not backend.prefills[len(batch_texts) :]:
        time.sleep(0.01)
    live = engine.submit_many([Submission(work("live one", 142)), Submission(work("y" * 290, 20))])
    backend.gate.set()
    assert [f.result(10).choices[0]["text"] for f in batch] == expected
    assert all(len(f.result(10).choices[0]["text"].split()) in (142, 20) for f in live)
    assert engine.preempted == 0
    rendered = [tuple(backend.render([{"content": t}], []).ids) for t in batch_texts]
    prefilled = [tuple(ids) for call in backend.prefills for ids in call]
    assert [prefilled.count(r) for r in rendered] == [2, 2]  # alone, then once in the batch
