"""What a live request holds against its key's tokens per minute before it runs: each
contract's ``estimate_tokens`` hook, which api/limits.py picks by the request's
capability, from the payloads the routes really build."""

from __future__ import annotations

from typing import Any

import pytest

from api import limits
from configs.capabilities import CAPABILITIES
from configs.catalog import CatalogEntry
from configs.settings import Settings
from tasks.contracts import audio, chat, embeddings
from tasks.contracts.chat import parse_body as parse_chat
from tasks.contracts.chat import to_work
from tasks.contracts.embeddings import normalise_input
from tasks.contracts.embeddings import parse_body as parse_embeddings

CHAT = CatalogEntry(
    id="me/chat",
    capability="chat",
    backend="workers.backends.fake:FakeChatBackend",
    source={"path": "/"},
    max_input_tokens=4096,
    batch_token_budget=8192,
    options={"max_input_tokens": 4096, "supports_images": True},
)
SETTINGS = Settings(models=["me/chat"])


def chat_work(**body: Any) -> dict[str, Any]:
    return to_work(parse_chat({"model": "me/chat", **body}), CHAT, SETTINGS)


def embedding_work(value: Any) -> dict[str, Any]:
    request = parse_embeddings({"model": "m", "input": value})
    return {"model": "m", "input": normalise_input(request, 2048)}


def test_embedding_text_is_four_characters_a_token_rounded_up() -> None:
    estimate = embeddings.estimate_tokens
    assert estimate(embedding_work("abcd")) == 1
    assert estimate(embedding_work("abcde")) == 2
    assert estimate(embedding_work(["ab", "cd", "é" * 8])) == 3  # 12 characters


def test_embedding_token_ids_count_one_each() -> None:
    assert embeddings.estimate_tokens(embedding_work([1, 2, 3])) == 3
    assert embeddings.estimate_tokens(embedding_work([[1, 2], [3, 4, 5, 6]])) == 6


def test_chat_holds_its_text_and_max_tokens_for_each_choice() -> None:
    messages = [
        {"role": "system", "content": "x" * 40},
        {"role": "user", "content": [{"type": "text", "text": "y" * 40}]},
    ]
    assert chat.estimate_tokens(chat_work(messages=messages, max_tokens=50)) == 20 + 50
    assert chat.estimate_tokens(chat_work(messages=messages, max_tokens=50, n=3)) == 20 + 150


def test_chat_without_max_tokens_holds_what_the_server_would_allow() -> None:
    work = chat_work(messages=[{"role": "user", "content": "hi"}])
    assert work["max_tokens"] > 0
    assert chat.estimate_tokens(work) == 1 + work["max_tokens"]


def test_an_image_counts_nothing_before_it_runs() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}
    content = [{"type": "text", "text": "what?"}, image]
    work = chat_work(messages=[{"role": "user", "content": content}], max_tokens=1)
    assert chat.estimate_tokens(work) == 2 + 1


def test_audio_and_empty_payloads_hold_nothing() -> None:
    work = {"model": "w", "audio": {"key": "a"}, "prompt": "p" * 100}
    assert audio.estimate_tokens(work) == 0  # charged when the answer is in
    assert chat.estimate_tokens({}) == embeddings.estimate_tokens({}) == 0


def test_the_limits_pick_the_hook_by_capability() -> None:
    text = {"input": ["x" * 8], "messages": [{"role": "user", "content": "y" * 40}]}
    assert limits.estimate_tokens("embeddings", text) == 2  # its input only
    assert limits.estimate_tokens("chat", text) == 10  # its messages only
    assert limits.estimate_tokens("audio", text) == 0


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_every_capability_estimates_an_empty_payload(capability: str) -> None:
    assert limits.estimate_tokens(capability, {}) >= 0
