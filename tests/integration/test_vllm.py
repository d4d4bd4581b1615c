"""Chat on vLLM's engine under laneway's lanes, against a real stack (Redis, a chat worker
process running ``AsyncLLM``, the database, the API), with vLLM's CPU build.

Skips where vLLM is not installed: ``./dev vllm-env`` builds the environment these run
in (``.venv-vllm``), and CI's vLLM stage runs them there. The model is a random Llama
with head size 64 (what vLLM's CPU attention supports); the reference is vLLM's own
``LLM.chat`` on the same weights, run in this process before the stack starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.chat_models import build_llama, chat_entry, write_catalog
from tests.harness import Stack, descendants, pid_alive, wait_until
from tests.integration.batch_support import jsonl, read_lines, wait_finished
from tests.integration.test_chat import BAD, CHAT, error_of

try:
    from workers.chat_vllm import available

    MISSING = available()
except Exception as exc:  # pragma: no cover - the import itself failed
    MISSING = str(exc)

if MISSING is not None and os.environ.get("LANEWAY_REQUIRE_VLLM"):  # CI's vLLM stage
    raise RuntimeError(f"LANEWAY_REQUIRE_VLLM is set but vLLM is not available: {MISSING}")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.vllm,
    pytest.mark.timeout(600),
    pytest.mark.skipif(
        MISSING is not None,
        reason=f"vLLM is not installed here ({MISSING}); `./dev vllm-env` builds .venv-vllm",
    ),
]

MODEL = "test/vllm-llama"
LONG = 160  # completion tokens of the preemption and batch lines
PROMPTS = [f"tell me about topic {i}" for i in range(12)]
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_WORKER_MULTIPROC_METHOD": "spawn"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = build_llama(
        tmp_path_factory.mktemp("vllm-model"),
        layers=2,
        hidden=256,
        heads=4,
        kv_heads=2,
        intermediate=512,
        max_positions=2048,
        eos=False,  # every request runs to its max_tokens: equal lengths, slots held
        name="vllm-llama",
    )
    # vLLM also stops at the tokenizer's eos token: none, so no output ends early
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["eos_token"] = None
    config_path.write_text(json.dumps(config, indent=2))
    return path


def conversation(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> dict[tuple[str, int], tuple[str, list[int]]]:
    """vLLM's ``LLM.chat`` greedy outputs (text, token ids), one engine, then shut down."""
    from vllm import LLM, SamplingParams

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    llm = LLM(model=str(model_dir), dtype="float32", max_model_len=2048, max_num_seqs=4)
    out: dict[tuple[str, int], tuple[str, list[int]]] = {}
    try:
        for max_tokens in (20, LONG):
            results = llm.chat(
                [conversation(p) for p in PROMPTS],
                SamplingParams(temperature=0, max_tokens=max_tokens),
                use_tqdm=False,
            )
            for prompt, result in zip(PROMPTS, results, strict=True):
                done = result.outputs[0]
                out[(prompt, max_tokens)] = (done.text, list(done.token_ids))
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
    return out


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, model_dir: Path, reference: Any
) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("vllm-stack")
    catalog = write_catalog(
        root / "catalog.yaml",
        [
            chat_entry(
                MODEL,
                model_dir,
                engine="vllm",
                max_input_tokens=2048,
                max_tokens=24,
                max_running=4,
                live_reserve=1,
            )
        ],
    )
    stack = Stack(
        root,
        models=[MODEL, "laneway/fake-embeddings"],
        model_config=catalog,
        capability="chat",
        env={
            **ENV,
            "LANEWAY_CHUNK_LINES": "8",
            "LANEWAY_CHUNK_LEASE_S": "6",
            "LANEWAY_HEARTBEAT_S": "0.3",
        },
    )
    try:
        stack.start()
        stack.start_worker(timeout=400)
        stack.start_api()
        yield stack
    finally:
        stack.close()


def ask(prompt: str, **kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": conversation(prompt), **kw}


def worker_metrics(stack: Stack) -> dict[str, Any]:
    from tasks.queue.names import worker_metrics_key

    proc = stack.workers[-1]
    info = stack.worker_info(proc) or {}
    with contextlib.closing(stack.redis()) as r:
        raw = r.get(worker_metrics_key(info["id"]))
    return dict(json.loads(raw)["models"][MODEL]) if raw else {}


def test_health_names_the_engine(stack: Stack) -> None:
    health = httpx.get(f"{stack.base_url}/health", timeout=10).json()
    assert health["models"][MODEL]["engines"] == ["vllm"], health


def test_metrics_count_what_vllm_generated(stack: Stack) -> None:
    client = stack.openai_client()
    client.chat.completions.create(**ask(PROMPTS[5], temperature=0, max_tokens=5))
    wait_until(lambda: worker_metrics(stack).get("completion_tokens", 0) >= 5, 10, "metrics")
    metrics = httpx.get(f"{stack.base_url}/metrics", timeout=10)
    assert metrics.status_code == 200
    assert f'laneway_completion_tokens_total{{model="{MODEL}"' in metrics.text
    waits = [
        line
        for line in metrics.text.splitlines()
        if line.startswith("laneway_queue_wait_seconds_count{") and f'model="{MODEL}"' in line
    ]
    assert any('lane="live"' in line for line in waits), waits


def test_greedy_outputs_equal_vllms_own_generate(stack: Stack, reference: Any) -> None:
    client = stack.openai_client()
    for prompt in PROMPTS[:4]:
        out = client.chat.completions.create(**ask(prompt, temperature=0, max_tokens=20))
        text, ids = reference[(prompt, 20)]
        assert out.choices[0].message.content == text
        assert out.usage is not None and out.usage.completion_tokens == len(ids) == 20
        assert out.choices[0].finish_reason == "length"


def test_stream_n_seed_logprobs_and_stop(stack: Stack, reference: Any) -> None:
    client = stack.openai_client()
    chunks = list(
        client.chat.completions.create(
            **ask(PROMPTS[0], temperature=0, max_tokens=20),
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference[(PROMPTS[0], 20)][0]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20
    kw = ask(PROMPTS[1], temperature=1.0, top_p=0.9, max_tokens=8, n=2, seed=7)
    first = client.chat.completions.create(**kw, logprobs=True, top_logprobs=2)
    again = client.chat.completions.create(**kw, logprobs=True, top_logprobs=2)
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert first.choices[0].message.content != first.choices[1].message.content
    entry = first.choices[0].logprobs.content[0]  # type: ignore[union-attr, index]
    assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
    full = reference[(PROMPTS[2], 20)][0]
    stop = full.split()[3]
    cut = client.chat.completions.create(**ask(PROMPTS[2], temperature=0, max_tokens=20, stop=stop))
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == full[: full.index(stop)]
    penalised = client.chat.completions.create(
        **ask(PROMPTS[3], temperature=0, max_tokens=12, frequency_penalty=2.0, presence_penalty=1.0)
    )
    assert penalised.usage is not None and penalised.usage.completion_tokens == 12
    assert penalised.choices[0].message.content


async def _live_burst(base: str, n: int) -> list[int]:
    import aiohttp

    async with aiohttp.ClientSession() as http:

        async def one(i: int) -> int:
            body = ask(f"live question {i}", temperature=0, max_tokens=48)
            async with http.post(f"{base}/v1/chat/completions", json=body) as response:
                await response.read()
                return response.status

        return await asyncio.gather(*(one(i) for i in range(n)))


def batch_lines(prompts: list[str]) -> bytes:
    return jsonl(
        [
            {
                "custom_id": f"c{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": ask(p, temperature=0, max_tokens=LONG),
            }
            for i, p in enumerate(prompts)
        ]
    )


def test_live_requests_preempt_batch_sequences_whose_output_stays_the_same(
    stack: Stack, reference: Any
) -> None:
    """Batch holds 3 of 4 slots; bursts of live requests need more, so batch sequences
    are aborted and resumed from what they had generated: greedy lines equal vLLM's own
    unpreempted run, token for token, and each line's usage counts each token once."""
    client = stack.openai_client()
    before = worker_metrics(stack).get("preempted", 0)
    prompts = PROMPTS * 4
    upload = client.files.create(file=("b.jsonl", batch_lines(prompts)), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    wait_until(lambda: worker_metrics(stack).get("running_batch", 0) >= 3, 120, "batch running")
    assert worker_metrics(stack)["running_batch"] == 3  # max_running 4 less live_reserve 1
    # bursts until one overlaps enough to need a batch slot: on a loaded machine a burst's
    # requests may reach the worker one by one, each done before the next arrives; six
    # live requests together need more than the four slots, so a batch sequence running
    # beside them is preempted
    while (
        worker_metrics(stack)["preempted"] <= before
        and client.batches.retrieve(batch.id).status == "in_progress"
    ):
        assert asyncio.run(_live_burst(stack.base_url, 6)) == [200] * 6
    done = wait_finished(client, batch.id, timeout=300)
    assert done.status == "completed", done
    assert worker_metrics(stack)["preempted"] > before, "no batch sequence was preempted"
    output = {x["custom_id"]: x for x in read_lines(client, done.output_file_id)}
    assert len(output) == len(prompts)
    for i, prompt in enumerate(prompts):
        body = output[f"c{i}"]["response"]["body"]
        text, ids = reference[(prompt, LONG)]
        assert body["choices"][0]["message"]["content"] == text, i
        assert body["usage"]["completion_tokens"] == len(ids) == LONG


def test_a_caller_who_hangs_up_is_aborted_in_vllm(stack: Stack) -> None:
    body = {**ask("go on", temperature=0, max_tokens=2000), "stream": True}
    time.sleep(1.0)  # the worker's counters as they are before this request (0.3 s beats)
    before = worker_metrics(stack)["completion_tokens"]
    with (
        httpx.Client(base_url=stack.base_url, timeout=30) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        seen = 0
        for line in response.iter_lines():
            seen += line.startswith("data: {")
            assert '"finish_reason":"' not in line.replace(" ", ""), line  # still running
            if seen >= 5:
                break

    # the counters are published every 0.3 s, so one snapshot may predate the stream
    # (or its abort): wait until two snapshots a few beats apart show nothing running
    def settled() -> bool:
        first = worker_metrics(stack)
        time.sleep(1.0)
        last = worker_metrics(stack)
        return last["running_live"] == 0 and last["completion_tokens"] == first["completion_tokens"]

    wait_until(settled, 20, "the stream aborted")
    tokens = worker_metrics(stack)["completion_tokens"]
    time.sleep(1.5)  # an orphaned sequence would keep generating
    assert worker_metrics(stack)["completion_tokens"] == tokens
    assert tokens - before < 2000, "the stream ran to its max_tokens: it was not aborted"


@pytest.mark.parametrize(("case", "body", "status", "param"), BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_errors(
    stack: Stack, case: str, body: dict[str, Any], status: int, param: str | None
) -> None:
    body = {**body, "model": MODEL} if body.get("model") == CHAT else body
    if case == "embeddings model":
        body = {**body, "model": "laneway/fake-embeddings"}
    with stack.http() as http:
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    error = error_of(response)
    if param is not None:
        assert error["param"] == param, error
    assert error["message"]


def test_prompt_over_the_context_names_both_numbers(stack: Stack) -> None:
    with stack.http() as http:
        response = http.post("/v1/chat/completions", json=ask("word " * 2100, max_tokens=20))
    assert response.status_code == 400, response.text
    message = error_of(response)["message"]
    assert "2048" in message and "20 in the completion" in message, message


def test_a_batch_survives_its_worker_sigkilled_mid_chunk(stack: Stack, reference: Any) -> None:
    """The last test: it replaces the worker. Every line is answered exactly once."""
    client = stack.openai_client()
    prompts = PROMPTS * 2
    upload = client.files.create(file=("k.jsonl", batch_lines(prompts)), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    wait_until(lambda: worker_metrics(stack).get("running_batch", 0) >= 1, 120, "batch running")
    time.sleep(1.0)
    engine_core = descendants(stack.workers[-1].pid)
    assert engine_core, "the worker runs vLLM's engine core in a child process"
    stack.kill_worker(signal.SIGKILL)
    stack.start_worker(timeout=400)
    done = wait_finished(client, batch.id, timeout=400)
    assert done.status == "completed", done
    assert done.request_counts is not None and done.request_counts.failed == 0
    lines = read_lines(client, done.output_file_id)
    ids = [x["custom_id"] for x in lines]
    assert sorted(ids) == sorted(f"c{i}" for i in range(len(prompts)))  # each exactly once
    for line in lines:
        i = int(line["custom_id"][1:])
        text, _ = reference[(prompts[i], LONG)]
        assert line["response"]["body"]["choices"][0]["message"]["content"] == text
    # the killed worker's engine core is not left behind, holding memory
    wait_until(lambda: not any(pid_alive(p) for p in engine_core), 60, "the old engine core exited")
