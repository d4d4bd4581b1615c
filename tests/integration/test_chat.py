"""Chat completions against a real stack: Redis, a chat worker process, the database and
the API, serving tiny random-weight Llama models built here (no ``backend`` in their
catalog entries), called with the official ``openai`` client."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.chat_models import build_llama, build_qwen_vl, chat_entry, write_catalog
from tests.harness import Stack
from tests.integration.batch_support import jsonl, read_lines, wait_finished

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CHAT = "test/tiny-llama"
SLOW = "test/tiny-llama-one-slot"  # one running sequence at a time, long completions
VL = "test/tiny-qwen-vl"
BERT = "test/tiny-llama-bert-tokenizer"  # its tokenizer returns token_type_ids
INLINE_MAX = 4096  # images over this travel by file-store reference
IMAGE_MAX = 200_000
IMAGES_PER_REQUEST = 3
REQUEST_PIXELS = 20_000  # one 120x120 image (14,400) passes, two do not
EMBED = "laneway/fake-embeddings"
PROMPTS = ["hello there", "what is the capital of france", "tell me about dogs"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_llama(tmp_path_factory.mktemp("models"), max_positions=4096)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_llama(tmp_path_factory.mktemp("bert"), bert_tokenizer=True, name="bert")


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_qwen_vl(tmp_path_factory.mktemp("vl"))


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, model_dir: Path, vl_dir: Path, bert_dir: Path
) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("chat-stack")
    catalog = write_catalog(
        root / "catalog.yaml",
        [
            chat_entry(CHAT, model_dir, max_input_tokens=512, max_tokens=24, max_running=8),
            chat_entry(SLOW, model_dir, max_input_tokens=4096, max_tokens=3000, max_running=1),
            chat_entry(VL, vl_dir, images=True, max_tokens=12),
            chat_entry(BERT, bert_dir, max_tokens=12),
        ],
    )
    stack = Stack(
        root,
        models=[CHAT, SLOW, VL, BERT, EMBED],
        model_config=catalog,
        capability="chat",
        env={
            "LANEWAY_IMAGE_FETCH": "true",
            "LANEWAY_IMAGE_FETCH_HOSTS": "127.0.0.1,10.0.0.1,169.254.169.254,localhost",
            "LANEWAY_IMAGE_INLINE_MAX_BYTES": str(INLINE_MAX),
            "LANEWAY_IMAGE_MAX_BYTES": str(IMAGE_MAX),
            "LANEWAY_IMAGE_MAX_PER_REQUEST": str(IMAGES_PER_REQUEST),
            "LANEWAY_IMAGE_MAX_REQUEST_PIXELS": str(REQUEST_PIXELS),
        },
    )
    try:
        stack.start()
        stack.start_worker(timeout=180)
        stack.start_api()
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> Any:
    return greedy_reference(model_dir)


def greedy_reference(model_dir: Path) -> Any:
    """``model.generate`` greedy, in this process, on the same weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()

    def generate(content: str, max_tokens: int) -> tuple[str, int, int]:
        enc = tok.apply_chat_template(
            [{"role": "user", "content": content}],
            add_generation_prompt=True,
            return_dict=True,
            return_tensors="pt",
        )
        with torch.inference_mode():
            out = model.generate(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                max_new_tokens=max_tokens,
                do_sample=False,
            )
        new = out[0, enc["input_ids"].shape[1] :].tolist()
        return tok.decode(new, skip_special_tokens=True), enc["input_ids"].shape[1], len(new)

    return generate


def ask(content: str, **kw: Any) -> dict[str, Any]:
    return {"model": CHAT, "messages": [{"role": "user", "content": content}], **kw}


def test_greedy_text_and_usage_equal_model_generate(stack: Stack, reference: Any) -> None:
    client = stack.openai_client()
    for prompt in PROMPTS:
        out = client.chat.completions.create(**ask(prompt, temperature=0, max_tokens=20))
        text, prompt_tokens, new_tokens = reference(prompt, 20)
        choice = out.choices[0]
        assert choice.message.content == text
        assert choice.message.role == "assistant"
        assert out.usage is not None
        assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (prompt_tokens, new_tokens)
        assert out.usage.total_tokens == prompt_tokens + new_tokens
        assert choice.finish_reason == ("length" if new_tokens == 20 else "stop")
        assert out.object == "chat.completion" and out.model == CHAT
        assert out.system_fingerprint and out.id.startswith("chatcmpl-")


def test_a_tokenizer_with_token_type_ids_is_served(stack: Stack, bert_dir: Path) -> None:
    """``transformers serve`` without continuous batching answers 500 here."""
    from transformers import AutoTokenizer

    assert "token_type_ids" in AutoTokenizer.from_pretrained(bert_dir)("hello")
    client = stack.openai_client()
    out = client.chat.completions.create(
        model=BERT, messages=[{"role": "user", "content": "hello"}], temperature=0, max_tokens=8
    )
    assert out.choices[0].message.content == greedy_reference(bert_dir)("hello", 8)[0]


def test_stream_deltas_concatenate_to_the_text(stack: Stack) -> None:
    client = stack.openai_client()
    for prompt in PROMPTS:
        full = client.chat.completions.create(**ask(prompt, temperature=0, max_tokens=20))
        chunks = list(
            client.chat.completions.create(
                **ask(prompt, temperature=0, max_tokens=20),
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == full.choices[0].message.content
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finishes[-1] == full.choices[0].finish_reason
        assert all(f is None for f in finishes[:-1])
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
        assert len({c.id for c in chunks}) == 1


def test_stop_and_max_tokens_give_their_finish_reason(stack: Stack) -> None:
    client = stack.openai_client()
    full = client.chat.completions.create(**ask(PROMPTS[1], temperature=0, max_tokens=20))
    text = full.choices[0].message.content or ""
    words = text.split()
    assert len(words) > 4, text
    stop = words[3]
    cut = client.chat.completions.create(
        **ask(PROMPTS[1], temperature=0, max_tokens=20, stop=[stop])
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index(stop)]
    short = client.chat.completions.create(**ask(PROMPTS[1], temperature=0, max_tokens=3))
    assert short.choices[0].finish_reason == "length"
    assert short.usage is not None and short.usage.completion_tokens == 3
    streamed = client.chat.completions.create(
        **ask(PROMPTS[1], temperature=0, max_tokens=20, stop=stop), stream=True
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text[: text.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_sampling_n_seed_and_logprobs(stack: Stack) -> None:
    client = stack.openai_client()
    kw = ask(PROMPTS[0], temperature=1.0, top_p=0.9, max_tokens=8, n=3, seed=7)
    first = client.chat.completions.create(**kw, logprobs=True, top_logprobs=2)
    again = client.chat.completions.create(**kw, logprobs=True, top_logprobs=2)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert first.usage is not None
    assert first.usage.completion_tokens == sum(
        len(c.logprobs.content or []) for c in first.choices if c.logprobs
    )
    entry = first.choices[0].logprobs.content[0]  # type: ignore[union-attr, index]
    assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
    penalised = client.chat.completions.create(
        **ask(PROMPTS[0], temperature=0, max_tokens=12, frequency_penalty=2.0, presence_penalty=2.0)
    )
    assert penalised.choices[0].message.content is not None


def test_a_chat_batch_matches_the_live_endpoint(stack: Stack) -> None:
    client = stack.openai_client()
    prompts = [f"{PROMPTS[i % 3]} number {i}" for i in range(24)]
    lines = [
        {
            "custom_id": f"c{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": ask(p, temperature=0, max_tokens=10),
        }
        for i, p in enumerate(prompts)
    ]
    lines.append(
        {
            "custom_id": "bad",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": CHAT, "messages": []},
        }
    )
    upload = client.files.create(file=("chat.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait_finished(client, batch.id, timeout=180)
    assert done.status == "completed", done
    output = {x["custom_id"]: x for x in read_lines(client, done.output_file_id)}
    errors = {x["custom_id"]: x for x in read_lines(client, done.error_file_id)}
    assert errors["bad"]["response"]["status_code"] == 400
    completion_tokens = 0
    for i, prompt in enumerate(prompts[:6]):
        live = client.chat.completions.create(**ask(prompt, temperature=0, max_tokens=10))
        body = output[f"c{i}"]["response"]["body"]
        assert body["choices"][0]["message"]["content"] == live.choices[0].message.content
    for line in output.values():
        completion_tokens += line["response"]["body"]["usage"]["completion_tokens"]
    assert done.usage is not None and done.usage.output_tokens == completion_tokens > 0


def test_a_client_that_hangs_up_mid_stream_frees_its_slot(stack: Stack) -> None:
    """The one-slot model runs one sequence at a time: a 3,000-token stream whose client
    hangs up must give its slot to the next request within a few decode steps."""
    body = {
        "model": SLOW,
        "messages": [{"role": "user", "content": "go"}],
        "stream": True,
        "temperature": 0,
    }
    with httpx.Client(base_url=stack.base_url, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            seen = 0
            for line in response.iter_lines():
                seen += line.startswith("data: {")
                if seen >= 5:
                    break
        started = time.monotonic()
        short = http.post(
            "/v1/chat/completions",
            json={"model": SLOW, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        )
        took = time.monotonic() - started
    assert short.status_code == 200, short.text
    assert short.json()["usage"]["completion_tokens"] <= 4
    assert took < 3.0, f"the next request waited {took:.1f}s for the abandoned stream's slot"


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    return dict(body["error"])


BAD: list[tuple[str, dict[str, Any], int, str | None]] = [
    (
        "unknown model",
        {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
        404,
        "model",
    ),
    (
        "embeddings model",
        {"model": EMBED, "messages": [{"role": "user", "content": "x"}]},
        400,
        "model",
    ),
    ("empty messages", {"model": CHAT, "messages": []}, 400, "messages"),
    (
        "bad role",
        {"model": CHAT, "messages": [{"role": "bot", "content": "x"}]},
        400,
        "messages[0].role",
    ),
    (
        "bad part",
        {"model": CHAT, "messages": [{"role": "user", "content": [{"type": "video"}]}]},
        400,
        "messages[0].content[0].type",
    ),
    ("n zero", {**ask("x"), "n": 0}, 400, "n"),
    ("n huge", {**ask("x"), "n": 10_000}, 400, "n"),
    ("max_tokens zero", {**ask("x"), "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens over context", {**ask("x"), "max_tokens": 100_000}, 400, "max_tokens"),
    ("messages not a list", {"model": CHAT, "messages": "hello"}, 400, "messages"),
    (
        "json_object",
        {**ask("x"), "response_format": {"type": "json_object"}},
        400,
        "response_format",
    ),
    (
        "tools",
        {**ask("x"), "tools": [{"type": "function", "function": {"name": "f"}}]},
        400,
        "tools",
    ),
    (
        "image to a text model",
        {
            "model": CHAT,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
                    ],
                }
            ],
        },
        400,
        None,
    ),
]


@pytest.mark.parametrize(("case", "body", "status", "param"), BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_errors(
    stack: Stack, case: str, body: dict[str, Any], status: int, param: str | None
) -> None:
    with stack.http() as http:
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    error = error_of(response)
    if param is not None:
        assert error["param"] == param, error
    assert error["message"]


def test_prompt_over_the_context_names_both_numbers(stack: Stack) -> None:
    with stack.http() as http:
        response = http.post("/v1/chat/completions", json=ask("word " * 600, max_tokens=20))
        again = http.post("/v1/chat/completions", json={**ask("word " * 600), "stream": True})
    assert response.status_code == 400, response.text
    message = error_of(response)["message"]
    assert "512" in message and "20 in the completion" in message, message
    assert again.status_code == 400 and "512" in error_of(again)["message"]


def test_a_chat_model_on_embeddings_is_refused(stack: Stack) -> None:
    with stack.http() as http:
        response = http.post("/v1/embeddings", json={"model": CHAT, "input": "x"})
    assert response.status_code == 400
    assert "chat" in error_of(response)["message"]


IMAGE_URLS = [
    "http://127.0.0.1/x.png",
    "http://10.0.0.1/x.png",
    "http://169.254.169.254/latest/meta-data/",
    "file:///etc/passwd",
    "data:image/png;base64,not-base64!",
    "data:image/png;base64,aGVsbG8gd29ybGQ=",  # decodes, but is no image
]


@pytest.mark.parametrize("url", IMAGE_URLS)
def test_image_urls_that_are_refused(stack: Stack, url: str) -> None:
    image = {"type": "image_url", "image_url": {"url": url}}
    body = {"model": CHAT, "messages": [{"role": "user", "content": [image]}]}
    with stack.http() as http:
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert error_of(response)["param"].startswith("messages[0].content[0]")


def test_worker_still_serves_after_bad_input(stack: Stack) -> None:
    client = stack.openai_client()
    out = client.chat.completions.create(**ask("still there?", max_tokens=4))
    assert out.choices[0].message.content is not None
    assert json.loads(out.model_dump_json())["usage"]["completion_tokens"] <= 4


def test_metrics_count_generated_tokens(stack: Stack) -> None:
    client = stack.openai_client()
    client.chat.completions.create(**ask("count me", max_tokens=4))
    with stack.http() as http:
        deadline = time.monotonic() + 10
        while True:
            text = http.get("/metrics").text
            if f'laneway_completion_tokens_total{{model="{CHAT}"' in text:
                break
            assert time.monotonic() < deadline, text[-2000:]
            time.sleep(0.5)
    assert (
        'laneway_request_duration_seconds_count{model="test/tiny-llama",route="/v1/chat/completions"'
        in text
    )


def noise_png(side: int, seed: int = 0) -> bytes:
    """A PNG of random pixels: it does not compress, so its size follows ``side``."""
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def data_uri(png: bytes) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(png).decode()


def image_message(png: bytes, text: str = "what is in this picture?") -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": text},
                {"type": "image_url", "image_url": {"url": data_uri(png)}},
            ],
        }
    ]


def vl_reference(vl_dir: Path, png: bytes, text: str, max_tokens: int) -> str:
    import io

    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    from tests.chat_models import qwen_vl_inputs

    tok = AutoTokenizer.from_pretrained(vl_dir)
    model = AutoModelForImageTextToText.from_pretrained(vl_dir).eval()
    messages = [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image"}]}]
    picture = Image.open(io.BytesIO(png)).convert("RGB")
    inputs = qwen_vl_inputs(tok, AutoImageProcessor.from_pretrained(vl_dir), messages, [picture])
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
    return str(tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))


def stored_images(stack: Stack) -> list[Path]:
    return [p for p in stack.root.rglob("images/*") if p.is_file()]


@pytest.mark.parametrize("side", [16, 120], ids=["inline", "by-reference"])
def test_an_image_answer_equals_model_generate(stack: Stack, vl_dir: Path, side: int) -> None:
    png = noise_png(side)
    assert (len(png) > INLINE_MAX) == (side > 16)
    client = stack.openai_client()
    out = client.chat.completions.create(
        model=VL,
        messages=image_message(png),
        temperature=0,
        max_tokens=10,  # type: ignore[arg-type]
    )
    assert out.choices[0].message.content == vl_reference(
        vl_dir, png, "what is in this picture?", 10
    )
    assert out.usage is not None and out.usage.prompt_tokens > 10
    assert stored_images(stack) == []  # a stored copy is deleted once the request is done


def test_an_oversized_or_undecodable_image_is_refused(stack: Stack) -> None:
    big = noise_png(300)
    assert len(big) > IMAGE_MAX
    with stack.http() as http:
        for png in (big, b"\x89PNG\r\n\x1a\n" + b"broken" * 10):
            body = {"model": VL, "messages": image_message(png)}
            response = http.post("/v1/chat/completions", json=body)
            assert response.status_code == 400, response.text
            assert error_of(response)["param"] == "messages[0].content[1].image_url.url"


def images_message(*pngs: bytes) -> list[dict[str, Any]]:
    parts = [{"type": "image_url", "image_url": {"url": data_uri(p)}} for p in pngs]
    return [{"role": "user", "content": [{"type": "text", "text": "compare"}, *parts]}]


def test_images_per_request_and_their_pixels_are_capped_live_and_in_a_batch(
    stack: Stack,
) -> None:
    """Too many images (400 naming ``messages``, before any is decoded) and too many pixels
    together (400 at the image that passes the limit): the same error live and as a batch
    line, where it is that line's entry in the error file."""
    small, large = noise_png(16), noise_png(120)
    bodies = {
        "too-many": {"model": VL, "messages": images_message(*[small] * 4), "max_tokens": 2},
        "too-large": {"model": VL, "messages": images_message(large, large), "max_tokens": 2},
    }
    live: dict[str, dict[str, Any]] = {}
    with stack.http() as http:
        for name, body in bodies.items():
            response = http.post("/v1/chat/completions", json=body)
            assert response.status_code == 400, response.text
            live[name] = error_of(response)
    assert live["too-many"]["param"] == "messages"
    assert f"at most {IMAGES_PER_REQUEST} images" in live["too-many"]["message"]
    assert live["too-large"]["param"] == "messages[0].content[2].image_url.url"
    assert f"limit of {REQUEST_PIXELS} pixels per request" in live["too-large"]["message"]
    assert stored_images(stack) == []  # the first image, stored already, is deleted
    client = stack.openai_client()
    fine = {"model": VL, "messages": images_message(*[small] * 3), "max_tokens": 2}
    lines = [
        {"custom_id": name, "method": "POST", "url": "/v1/chat/completions", "body": body}
        for name, body in [*bodies.items(), ("fine", fine)]
    ]
    upload = client.files.create(file=("images.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait_finished(client, batch.id, timeout=180)
    assert done.status == "completed", done
    errors = {x["custom_id"]: x["response"] for x in read_lines(client, done.error_file_id)}
    assert set(errors) == set(bodies)
    for name, response in errors.items():
        assert response["status_code"] == 400
        assert response["body"]["error"] == live[name]
    [ok] = read_lines(client, done.output_file_id)
    assert ok["custom_id"] == "fine" and ok["response"]["status_code"] == 200


def test_remote_images_are_refused_when_fetching_is_off(stack: Stack) -> None:
    """Last in this module: it restarts the API with the default (fetching off)."""
    stack.restart_api({"LANEWAY_IMAGE_FETCH": "false"})
    image = {"type": "image_url", "image_url": {"url": "https://images.example.com/cat.png"}}
    with stack.http() as http:
        response = http.post(
            "/v1/chat/completions",
            json={"model": VL, "messages": [{"role": "user", "content": [image]}]},
        )
        assert response.status_code == 400, response.text
        assert "data:" in error_of(response)["message"]
        ok = http.post("/v1/chat/completions", json=ask("and now?", max_tokens=2))
    assert ok.status_code == 200, ok.text
