"""The tiny chat models of tests/chat_models.py: they build offline, load through the Auto
classes, generate, and the documented manual decode loops match greedy ``generate``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.chat_models import (
    IMAGE_PAD,
    build_llama,
    build_qwen_vl,
    chat_entry,
    png_image,
    qwen_vl_inputs,
    write_catalog,
)

NEW_TOKENS = 6
MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "developer", "content": [{"type": "text", "text": "Answer in English."}]},
    {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "!"}]},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "42"},
]
IMAGE_MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = build_llama(tmp_path_factory.mktemp("llama"))
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def qwen_vl(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Any]:
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    path = build_qwen_vl(tmp_path_factory.mktemp("qwen-vl"))
    return (
        AutoTokenizer.from_pretrained(path),
        AutoImageProcessor.from_pretrained(path),
        AutoModelForImageTextToText.from_pretrained(path).eval(),
    )


def greedy(model: Any, inputs: dict[str, Any]) -> torch.Tensor:
    """``generate``'s new tokens and their logits (steps, vocab) for one sequence."""
    out = model.generate(
        **inputs,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return torch.stack(out.logits, 1)[0]


def test_llama_template_and_tokenizer(llama: tuple[Any, Any]) -> None:
    tok, model = llama
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    for role in ("system", "developer", "user", "assistant", "tool"):
        assert f"<|im_start|>{role}\n" in text
    assert "Hello!" in text and '<tool_call>{"name": "f"' in text
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    encoded = tok(text)
    assert set(encoded) == {"input_ids", "attention_mask"}  # no token_type_ids
    assert encoded["input_ids"][0] == tok.convert_tokens_to_ids("<|im_start|>")  # no [CLS]
    assert model.config.vocab_size == len(tok)
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id == 0


def test_llama_generates_and_manual_decode_matches(llama: tuple[Any, Any]) -> None:
    from transformers import DynamicCache

    tok, model = llama
    enc = tok.apply_chat_template(
        MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    expected = greedy(model, dict(enc))
    assert tok.decode(expected.argmax(-1), skip_special_tokens=True).strip()

    ids, mask = enc["input_ids"], enc["attention_mask"]
    cache = DynamicCache(config=model.config)
    logits = []
    with torch.inference_mode():
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=torch.arange(ids.shape[1])[None],
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        for _ in range(NEW_TOKENS):
            logits.append(out.logits[0, -1])
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            position = torch.tensor([[cache.get_seq_length()]])
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            out = model(
                input_ids=token,
                attention_mask=mask,
                position_ids=position,
                cache=cache,
                use_cache=True,
            )
    torch.testing.assert_close(torch.stack(logits), expected, rtol=0, atol=1e-5)


def test_llama_without_eos_runs_to_max_tokens(tmp_path: Path) -> None:
    path = build_llama(tmp_path, eos=False, layers=1)
    generation = json.loads((path / "generation_config.json").read_text())
    assert "eos_token_id" not in generation and generation["pad_token_id"] == 0
    assert json.loads((path / "config.json").read_text()).get("eos_token_id") is None


def test_qwen_vl_generates_and_manual_decode_matches(qwen_vl: tuple[Any, Any, Any]) -> None:
    from transformers import DynamicCache

    tok, images, model = qwen_vl
    inputs = qwen_vl_inputs(tok, images, IMAGE_MESSAGES, [png_image(64)])
    # 64x64 -> 56x56: a 4x4 grid of 14 px patches, 2x2 merged into 4 image tokens
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert tuple(inputs["pixel_values"].shape) == (16, 3 * 2 * 14 * 14)
    pad_id = tok.convert_tokens_to_ids(IMAGE_PAD)
    assert int((inputs["input_ids"] == pad_id).sum()) == 4
    assert torch.equal(inputs["mm_token_type_ids"].bool(), inputs["input_ids"] == pad_id)
    expected = greedy(model, inputs)

    position_ids, rope_deltas = model.model.get_rope_index(
        inputs["input_ids"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )
    assert int(rope_deltas) < 0  # 4 image tokens hold 2 positions
    model.model.rope_deltas = None  # forget generate's state: this loop keeps none there
    cache = DynamicCache(config=model.config)
    mask = inputs["attention_mask"]
    logits = []
    with torch.inference_mode():
        out = model(
            **inputs, position_ids=position_ids, cache=cache, use_cache=True, logits_to_keep=1
        )
        for _ in range(NEW_TOKENS):
            logits.append(out.logits[0, -1])
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            position = (cache.get_seq_length() + rope_deltas).view(1, 1, 1).expand(3, 1, 1)
            out = model(
                input_ids=token,
                attention_mask=mask,
                position_ids=position,
                cache=cache,
                use_cache=True,
            )
    torch.testing.assert_close(torch.stack(logits), expected, rtol=0, atol=1e-5)


def test_qwen_vl_text_only(qwen_vl: tuple[Any, Any, Any]) -> None:
    tok, images, model = qwen_vl
    inputs = qwen_vl_inputs(tok, images, MESSAGES, [])
    assert "pixel_values" not in inputs
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_qwen_vl_counts_images(qwen_vl: tuple[Any, Any, Any]) -> None:
    tok, images, _ = qwen_vl
    with pytest.raises(ValueError, match="1 image parts but 0 images"):
        qwen_vl_inputs(tok, images, IMAGE_MESSAGES, [])


def test_write_catalog(tmp_path: Path) -> None:
    entries = [
        chat_entry("test/tiny-llama", tmp_path),
        chat_entry("test/tiny-qwen-vl", tmp_path, images=True, max_tokens=8),
    ]
    path = write_catalog(tmp_path / "catalog.yaml", entries)
    models = yaml.safe_load(path.read_text())["models"]
    assert models[0] == {
        "id": "test/tiny-llama",
        "capability": "chat",
        "source": {"path": str(tmp_path)},
        "defaults": {
            "max_input_tokens": 512,
            "max_tokens": 16,
            "max_running": 8,
            "batch_token_budget": 8192,
        },
    }
    assert models[1]["defaults"]["supports_images"] is True
    assert models[1]["defaults"]["max_tokens"] == 8
    assert all("backend" not in m for m in models)


def test_catalog_loads(tmp_path: Path) -> None:
    from configs.catalog import CAPABILITIES, load_catalog

    if "chat" not in CAPABILITIES:
        pytest.skip("the chat capability is not registered yet")
    path = write_catalog(tmp_path / "catalog.yaml", [chat_entry("test/tiny-llama", tmp_path)])
    entry = load_catalog(path).get("test/tiny-llama")
    assert entry.capability == "chat" and entry.max_input_tokens == 512
    assert entry.resolve_path(auto_download=False) == str(tmp_path)
