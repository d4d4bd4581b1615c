"""laneway's lanes on vLLM's engine (``workers/chat_vllm.py``), with a fake ``AsyncLLM``:
the slot accounting, preemption and resumption, aborts and failures, without vLLM.

The fake generates deterministically from everything before (the prompt and the tokens
so far), one token per step, the way greedy decoding does: a sequence resumed from its
prompt and what it had generated continues exactly as an unpreempted one. The real
engine's behaviour is checked in ``tests/integration/test_vllm.py`` (CI's vLLM stage).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from configs.catalog import CatalogEntry
from configs.settings import Settings
from tasks.errors import ContextLengthExceeded, InvalidRequest
from tasks.queue.names import BATCH, LIVE
from workers.chat_vllm import VllmApi, VllmChatEngine
from workers.jobs import Dropped, JobMeta

STEP_S = 0.004
VOCAB = 50


@dataclass
class Params:
    n: int
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str] | None
    presence_penalty: float
    frequency_penalty: float
    logprobs: int | None
    output_kind: Any
    skip_special_tokens: bool


@dataclass
class Delta:
    token_ids: list[int]
    text: str
    logprobs: Any = None
    finish_reason: str | None = None


@dataclass
class Out:
    outputs: list[Delta]


class Tokenizer:
    @staticmethod
    def decode(ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f" w{i}" for i in ids)


class Renderer:
    def render_chat(self, convs: list[Any], chat_params: Any, tok_params: Any) -> Any:
        [messages] = convs
        text = " ".join(str(m["content"]) for m in messages)
        if "template error" in text:
            raise ValueError("the template refused it")
        return convs, [{"prompt_token_ids": [len(w) % VOCAB for w in text.split()]}]

    def render_cmpl(self, prompts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [dict(p) for p in prompts]


@dataclass
class FakeLLM:
    """vLLM's ``AsyncLLM`` as far as the engine uses it; records what it ran."""

    renderer: Renderer = field(default_factory=Renderer)
    running: set[str] = field(default_factory=set)
    most_running: int = 0
    aborted: list[str] = field(default_factory=list)
    priorities: dict[str, int] = field(default_factory=dict)
    fail_on: list[int] | None = None  # a prompt whose generation breaks after a token
    shut: bool = False

    async def generate(
        self, prompt: dict[str, Any], params: Params, request_id: str, *, priority: int
    ) -> AsyncIterator[Out]:
        ids = list(prompt["prompt_token_ids"])
        self.priorities[request_id] = priority
        self.running.add(request_id)
        self.most_running = max(self.most_running, len(self.running))
        try:
            for k in range(params.max_tokens):
                await asyncio.sleep(STEP_S)
                if k == 1 and prompt["prompt_token_ids"] == self.fail_on:
                    raise RuntimeError("the engine broke")
                token = (sum(ids) * 31 + len(ids) + (params.seed or 0)) % VOCAB
                ids.append(token)
                last = k == params.max_tokens - 1
                yield Out([Delta([token], f" w{token}", None, "length" if last else None)])
        except (asyncio.CancelledError, GeneratorExit):
            self.aborted.append(request_id)
            raise
        finally:
            self.running.discard(request_id)

    def shutdown(self) -> None:
        self.shut = True


def entry(**options: Any) -> CatalogEntry:
    return CatalogEntry(
        id="fake/vllm",
        capability="chat",
        backend="workers.backends.chat:TransformersChatBackend",
        source={"path": "/"},
        max_input_tokens=256,
        batch_token_budget=4096,
        options={"max_running": 4, "live_reserve": 1, "max_tokens": 16, **options},
    )


@pytest.fixture
def engine() -> Iterator[tuple[VllmChatEngine, FakeLLM]]:
    fake = FakeLLM()

    async def start() -> VllmApi:
        return VllmApi(fake, Params, "delta", None, None, Tokenizer())

    eng = VllmChatEngine(entry(), Settings(), model_path="/", device="cpu", start=start)
    yield eng, fake
    eng.stop()


def work(text: str, max_tokens: int = 16, **kw: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, **kw}


def texts(results: list[Any]) -> list[str]:
    return [r.choices[0]["text"] for r in results]


def test_batch_holds_at_most_max_running_less_the_live_reserve(
    engine: tuple[VllmChatEngine, FakeLLM],
) -> None:
    eng, fake = engine
    futures = [eng.submit(work(f"batch {i} words", 20), lane=BATCH) for i in range(10)]
    results = [f.result(10) for f in futures]
    assert fake.most_running == 3  # 4 slots, 1 kept for live work
    assert all(r.completion_tokens == 20 for r in results)
    assert set(fake.priorities.values()) == {1}
    assert eng.preempted == 0


def test_live_work_preempts_the_newest_batch_sequences_which_resume_unchanged(
    engine: tuple[VllmChatEngine, FakeLLM],
) -> None:
    eng, fake = engine
    prompts = [f"batch line {i} with a few words" for i in range(6)]
    alone = texts([eng.submit(work(p, 60), lane=BATCH).result(10) for p in prompts])
    tokens_before = eng.tokens_out
    batch = [eng.submit(work(p, 60), lane=BATCH) for p in prompts]
    time.sleep(20 * STEP_S)  # three of them run, with some tokens each
    live = [eng.submit(work(f"live {i}", 8), lane=LIVE) for i in range(3)]
    assert all(f.result(10).completion_tokens == 8 for f in live)
    results = [f.result(10) for f in batch]
    assert eng.preempted >= 2  # 3 live + 3 batch > 4 slots: the two newest went back
    assert texts(results) == alone  # resumed from prompt + generated: the same output
    assert all(r.completion_tokens == 60 for r in results)
    # every token once: 6 batch lines of 60 and 3 live of 8, nothing generated twice
    assert eng.tokens_out - tokens_before == 6 * 60 + 3 * 8
    assert len(fake.aborted) == eng.preempted
    assert len(live_ids(fake)) == 3  # the live requests, at vLLM's first priority


def test_sequences_that_cannot_resume_unchanged_are_not_preempted(
    engine: tuple[VllmChatEngine, FakeLLM],
) -> None:
    """vLLM's presence and frequency penalties count the output alone: resumed, the
    tokens generated before would be prompt, and the output would change."""
    eng, _ = engine
    batch = [
        eng.submit(work(f"penalised {i}", 60, frequency_penalty=1.0), lane=BATCH) for i in range(3)
    ]
    time.sleep(20 * STEP_S)
    live = [eng.submit(work(f"live {i}", 4)) for i in range(2)]
    assert all(f.result(10).completion_tokens == 4 for f in live)
    assert all(f.result(10).completion_tokens == 60 for f in batch)
    assert eng.preempted == 0


def live_ids(fake: FakeLLM) -> set[str]:
    return {r for r, p in fake.priorities.items() if p == 0}


def test_live_requests_go_in_at_once_at_the_higher_priority(
    engine: tuple[VllmChatEngine, FakeLLM],
) -> None:
    eng, fake = engine
    result = eng.submit(work("hello there", 5, n=2, seed=3)).result(10)
    assert [c["index"] for c in result.choices] == [0, 1]
    assert len(live_ids(fake)) == 2  # one vLLM request per choice
    # each choice has its own seed (seed + index), as vLLM's own n > 1 gives them
    assert result.choices[0]["text"] != result.choices[1]["text"]
    assert result.completion_tokens == 10


def test_a_streaming_job_gets_its_deltas_in_order(engine: tuple[VllmChatEngine, FakeLLM]) -> None:
    eng, _ = engine
    got: list[dict[str, Any]] = []
    result = eng.submit(work("stream me", 6), emit=got.extend).result(10)
    assert "".join(d["text"] for d in got) == result.choices[0]["text"]
    assert got[-1]["finish_reason"] == "length"
    assert all("finish_reason" not in d for d in got[:-1])


def test_a_caller_that_went_away_is_aborted(engine: tuple[VllmChatEngine, FakeLLM]) -> None:
    eng, fake = engine
    eng.gone = lambda ids: set(ids)
    meta = JobMeta("req_gone", None, time.time() - 1)
    future = eng.submit(work("long one", 200), meta=meta)
    with pytest.raises(Dropped):
        future.result(5)
    deadline = time.monotonic() + 2
    while fake.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not fake.running and fake.aborted


def test_a_failing_gone_look_up_keeps_the_engine_and_the_deadline(
    engine: tuple[VllmChatEngine, FakeLLM],
) -> None:
    eng, _ = engine

    def broken(ids: list[str]) -> set[str]:
        raise ConnectionError("redis is away")

    eng.gone = broken
    ok = eng.submit(work("still runs", 8), meta=JobMeta("req_ok", None, time.time() - 1))
    assert ok.result(5).completion_tokens == 8
    busy = [eng.submit(work(f"busy {i}", 200), lane=BATCH) for i in range(3)]  # every slot
    late = eng.submit(work("late", 8), lane=BATCH, meta=JobMeta("b", time.time() - 1, None))
    with pytest.raises(Dropped):  # waiting for a slot, no token yet: the deadline counts
        late.result(5)
    assert all(f.result(10).completion_tokens == 200 for f in busy)
    assert eng._gone_task.done() is False


def test_a_chunk_timeout_failing_the_future_aborts_the_sequences(
    engine: tuple[VllmChatEngine, FakeLLM],
) -> None:
    eng, fake = engine
    future = eng.submit(work("batch job", 200), lane=BATCH)
    time.sleep(10 * STEP_S)
    future.set_exception(TimeoutError("chunk timed out"))
    deadline = time.monotonic() + 2
    while fake.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not fake.running, "a job whose future failed keeps generating"


def test_an_engine_error_fails_that_job_alone(engine: tuple[VllmChatEngine, FakeLLM]) -> None:
    eng, fake = engine
    fake.fail_on = [len("breaks")]  # the fake renderer's ids: word lengths
    good = eng.submit(work("fine", 5))
    bad = eng.submit(work("breaks", 5, n=2))
    with pytest.raises(RuntimeError, match="broke"):
        bad.result(5)
    assert good.result(5).completion_tokens == 5
    fake.fail_on = None
    assert eng.submit(work("after", 3)).result(5).completion_tokens == 3


def test_context_and_template_errors_are_400s(engine: tuple[VllmChatEngine, FakeLLM]) -> None:
    eng, _ = engine
    with pytest.raises(ContextLengthExceeded, match="256"):
        eng.submit(work("x", 300)).result(5)
    with pytest.raises(InvalidRequest, match="template refused"):
        eng.submit(work("template error")).result(5)
    with pytest.raises(InvalidRequest, match="does not accept images"):
        eng.submit(work("x"), images=[b"png"]).result(5)


def test_stop_fails_what_is_pending_and_shuts_vllm_down() -> None:
    fake = FakeLLM()

    async def start() -> VllmApi:
        return VllmApi(fake, Params, "delta", None, None, Tokenizer())

    eng = VllmChatEngine(entry(), Settings(), model_path="/", device="cpu", start=start)
    futures = [eng.submit(work(f"b {i}", 200), lane=BATCH) for i in range(6)]
    time.sleep(5 * STEP_S)
    eng.stop()
    for f in futures:
        with pytest.raises(RuntimeError, match="stopped"):
            f.result(5)
    assert fake.shut
    with pytest.raises(RuntimeError, match="stopped"):
        eng.submit(work("late")).result(1)


@pytest.mark.parametrize(
    ("option", "default", "installed", "expected"),
    [
        (None, "auto", True, "auto"),  # the extra installed: vLLM, no catalog edit
        (None, "auto", False, "transformers"),  # not installed: our own, said in the log
        ("vllm", "auto", False, "transformers"),
        ("vllm", "transformers", True, "vllm"),  # the entry's own choice wins
        (None, "transformers", True, "transformers"),  # LANEWAY_CHAT_ENGINE for the rest
        ("transformers", "vllm", True, "transformers"),
    ],
)
def test_which_engine_serves_an_entry(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    option: str | None,
    default: str,
    installed: bool,
    expected: str,
) -> None:
    from workers import chat

    monkeypatch.setattr(chat, "vllm_available", lambda: None if installed else "No module")
    options = {} if option is None else {"engine": option}
    with caplog.at_level("INFO", logger="workers.chat"):
        assert chat.engine_wanted(entry(**options), default) == expected
    if not installed and expected == "transformers":
        assert "vLLM is not available (No module)" in caplog.text


def test_an_entry_with_a_backend_of_its_own_stays_on_it() -> None:
    from dataclasses import replace

    from workers import chat

    own = replace(entry(engine="vllm"), backend="workers.backends.fake:Something")
    assert chat.engine_wanted(own, "auto") == "transformers"


def test_image_parts_reach_vllm_decoded_in_their_order() -> None:
    """Each ``{"type": "image"}`` part becomes an ``image_pil`` part holding the picture
    laneway fetched and checked (vLLM is never handed a URL to fetch), in the order the
    parts come; text parts and other messages are as they were."""
    from tests.chat_models import png_bytes
    from workers.chat_vllm import vllm_messages

    small, large = png_bytes(16), png_bytes(48)
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image"}]},
        {"role": "assistant", "content": None},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "b"}]},
    ]
    out = vllm_messages(messages, [small, large])
    assert out[0] == messages[0] and out[2] == {"role": "assistant", "content": ""}
    assert out[1]["content"][0] == {"type": "text", "text": "a"}
    assert out[3]["content"][1] == {"type": "text", "text": "b"}
    first, second = out[1]["content"][1], out[3]["content"][0]
    assert first["type"] == second["type"] == "image_pil"
    assert first["image_pil"].size == (16, 16) and second["image_pil"].size == (48, 48)
    assert first["image_pil"].mode == "RGB"
    assert all("url" not in str(part) for m in out[1:] for part in m["content"] or [])
