"""Chat models on Hugging Face transformers: the prompt through the model's own chat
template, and the two forwards a continuous-batching scheduler needs.

The scheduler (``workers/chat_engine.py``) keeps one KV cache for every running
sequence, left-padded to a common length with an attention mask. A backend gives it:

- ``render``: messages to prompt token ids (and, for image models, the processed
  images), with the chat template and the generation prompt;
- ``prefill``: a batch of new sequences in one forward: the logits of their last
  position and their cache;
- ``decode``: one token per running sequence in one forward, against the shared cache;
- cache surgery (``select``, ``merge``, ``trim``), so sequences join between decode
  steps and leave when they finish, and ``rollback`` after a decode that failed part way
  (out of memory), so the scheduler can shrink the batch and go on with the same cache.
"""

from __future__ import annotations

import inspect
import io
import logging
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
    DynamicCache,
)

from tasks.contracts.chat import ChatLimits
from tasks.errors import InvalidRequest
from workers.backends.base import ModelBackend
from workers.backends.torch_dtype import torch_dtype

log = logging.getLogger(__name__)


class OutOfMemory(Exception):
    """The device ran out of memory during a forward (the scheduler halves its batch)."""


@dataclass
class Prompt:
    """A rendered prompt: its token ids and, for image models, the model inputs that go
    with them in the prefill (pixel values, grid sizes)."""

    ids: list[int]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Batch:
    """The running sequences' shared state: KV cache, attention mask (left padding),
    and each row's position offset (non-zero for models with multimodal rope)."""

    cache: DynamicCache
    mask: torch.Tensor  # (rows, columns) of 0/1
    offsets: torch.Tensor  # (rows,) added to a row's token count to get its position

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])


class ChatBackend(ModelBackend):
    capabilities = ("chat",)
    eos_ids: frozenset[int]
    vocab_size: int

    @abstractmethod
    def render(self, messages: Sequence[dict[str, Any]], images: Sequence[bytes]) -> Prompt:
        """The prompt for ``messages`` (image parts, in order, are ``images``)."""

    @abstractmethod
    def prefill(self, prompts: Sequence[Prompt]) -> tuple[torch.Tensor, Batch]:
        """One forward over new sequences: last-position logits (rows, vocab), their batch."""

    @abstractmethod
    def decode(self, batch: Batch, tokens: torch.Tensor) -> torch.Tensor:
        """One token per row (``tokens``: (rows,)) appended; the next logits (rows, vocab).

        The mask gets its new column only once the forward succeeded. A forward that
        fails leaves the mask as it was, but the layers that ran before the failure
        have appended their column: ``rollback`` cuts them back."""

    @abstractmethod
    def text(self, ids: Sequence[int]) -> str:
        """Generated ids as text (special tokens left out)."""

    @abstractmethod
    def token_text(self, token: int) -> str:
        """One token as text, for log-probabilities."""


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``t`` padded with zeros on the left along ``dim`` to ``width``."""
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _layers(cache: DynamicCache) -> list[Any]:
    """The cache's per-layer key/value holders (``keys``, ``values``: (rows, heads,
    columns, dim)); models whose layers keep other state are not supported."""
    layers = list(cache.layers)
    if not all(hasattr(layer, "keys") and hasattr(layer, "values") for layer in layers):
        raise TypeError("continuous batching needs a key/value cache in every layer")
    return layers


def select(batch: Batch, rows: Sequence[int]) -> Batch:
    """Only ``rows`` of the batch, in that order."""
    index = torch.as_tensor(list(rows), dtype=torch.long, device=batch.mask.device)
    batch.cache.batch_select_indices(index)
    return trim(Batch(batch.cache, batch.mask[index], batch.offsets[index]))


def trim(batch: Batch) -> Batch:
    """Columns that are padding in every row dropped from the left."""
    used = batch.mask.sum(dim=0) > 0
    if not bool(used.any()) or bool(used[0]):
        return batch
    first = int(torch.nonzero(used)[0, 0])
    for layer in _layers(batch.cache):
        layer.keys = layer.keys[:, :, first:]
        layer.values = layer.values[:, :, first:]
    return Batch(batch.cache, batch.mask[:, first:], batch.offsets)


def rollback(batch: Batch, columns: int) -> None:
    """``batch`` back to ``columns`` columns (its width before a decode that failed):
    the mask and every layer's keys and values. A decode appends one column per layer as
    the forward goes through them, so an out-of-memory inside layer k leaves layers
    0..k-1 (and perhaps k) a column wider than the rest; a cache kept like that would
    misalign every later step. Columns are only cut from the right (the new ones)."""
    batch.mask = batch.mask[:, :columns]
    for layer in _layers(batch.cache):
        if layer.keys is not None and layer.keys.shape[2] > columns:
            layer.keys = layer.keys[:, :, :columns]
            layer.values = layer.values[:, :, :columns]


def merge(a: Batch | None, b: Batch) -> Batch:
    """The rows of ``a`` then those of ``b``, left-padded to the longer of the two."""
    if a is None or a.rows == 0:
        return b
    width = max(a.mask.shape[1], b.mask.shape[1])
    for la, lb in zip(_layers(a.cache), _layers(b.cache), strict=True):
        la.keys = torch.cat([_left_pad(la.keys, width, 2), _left_pad(lb.keys, width, 2)])
        la.values = torch.cat([_left_pad(la.values, width, 2), _left_pad(lb.values, width, 2)])
    mask = torch.cat([_left_pad(a.mask, width, 1), _left_pad(b.mask, width, 1)])
    return Batch(a.cache, mask, torch.cat([a.offsets, b.offsets]))


IMAGE_PAD = "<|image_pad|>"  # Qwen-VL's image placeholder, one per image in the template


class TransformersChatBackend(ChatBackend):
    """A causal language model with its tokenizer's chat template; with
    ``supports_images`` in its catalog defaults, a Qwen-VL-style image-text model, whose
    images go through its image processor and multimodal rope (see ``_vision``)."""

    tokenizer: Any
    model: Any
    image_processor: Any = None

    def load(self) -> None:
        self.limits = ChatLimits.from_entry(self.entry)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        dtype = torch_dtype(self.entry.dtype, self.device)
        auto = AutoModelForImageTextToText if self.limits.supports_images else AutoModelForCausalLM
        self.model = auto.from_pretrained(self.model_path, dtype=dtype)
        self.model.to(self.device).eval()
        # transformers 5.24 renamed the forward's ``past_key_values`` to ``cache``; an
        # older release ignores ``cache=`` without a word (every step then runs without
        # the cache): name whichever this one takes (vLLM's CPU wheel pins 5.19)
        takes = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in takes else "past_key_values"
        if self.limits.supports_images:
            # the image processor alone: AutoProcessor needs torchvision for Qwen-VL's
            # video half; the processor's other job (expanding placeholders) is done here
            self.image_processor = AutoImageProcessor.from_pretrained(self.model_path)
            self.image_token = int(self.tokenizer.convert_tokens_to_ids(IMAGE_PAD))
        self._init_tokens()
        log.info("loaded %s on %s (%s)", self.entry.id, self.device, dtype)

    def _init_tokens(self) -> None:
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self.vocab_size = int(self.model.config.get_text_config().vocab_size)
        self._specials = frozenset(self.tokenizer.all_special_ids)

    def warmup(self) -> None:
        prompt = self.render([{"role": "user", "content": "warm up"}], [])
        logits, batch = self.prefill([prompt, prompt])
        for _ in range(2):
            logits = self.decode(batch, logits.argmax(dim=-1))
        self.warm = True

    # -- prompts ------------------------------------------------------------------------

    def render(self, messages: Sequence[dict[str, Any]], images: Sequence[bytes]) -> Prompt:
        if images and self.image_processor is None:
            raise InvalidRequest(f"model {self.entry.id!r} does not accept images")
        if self.image_processor is None:
            messages = [{**m, "content": _flat_text(m.get("content"))} for m in messages]
        try:
            ids = self.tokenizer.apply_chat_template(
                list(messages), add_generation_prompt=True, tokenize=True, return_dict=False
            )
        except Exception as exc:  # a template's raise_exception: the messages break a rule
            raise InvalidRequest(
                f"the messages do not fit model {self.entry.id!r}'s chat template: {exc}",
                param="messages",
            ) from None
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        if not images:
            return Prompt(list(ids))
        return self._vision(list(ids), images)

    def _vision(self, ids: list[int], images: Sequence[bytes]) -> Prompt:
        """Each image's placeholder repeated to its token count, and its pixels (numpy:
        torch runs on the scheduler thread only, see ``workers.runtime.off_main_thread``)."""
        if ids.count(self.image_token) != len(images):
            raise InvalidRequest(
                f"model {self.entry.id!r}'s chat template placed "
                f"{ids.count(self.image_token)} images, not {len(images)}",
                param="messages",
            )
        pictures = [_picture(data) for data in images]
        vision = self.image_processor(images=pictures, return_tensors="np")
        merge = int(self.image_processor.merge_size) ** 2
        counts = iter(int(thw.prod()) // merge for thw in vision["image_grid_thw"])
        expanded: list[int] = []
        for token in ids:
            expanded.extend([token] * next(counts) if token == self.image_token else [token])
        extra = {
            "pixel_values": vision["pixel_values"],
            "image_grid_thw": vision["image_grid_thw"],
        }
        return Prompt(expanded, extra)

    # -- forwards -----------------------------------------------------------------------

    def _forward(self, **inputs: Any) -> Any:
        try:
            with torch.inference_mode():
                cache = inputs.pop("cache")
                return self.model(**inputs, **{self._cache_kw: cache}, use_cache=True)
        except torch.OutOfMemoryError as exc:
            raise OutOfMemory(str(exc)) from exc

    def prefill(self, prompts: Sequence[Prompt]) -> tuple[torch.Tensor, Batch]:
        """Text prompts in one forward; a prompt with images in one of its own (its
        pixels and multimodal positions are its own)."""
        text = [i for i, p in enumerate(prompts) if not p.extra]
        parts: list[tuple[list[int], torch.Tensor, Batch]] = []
        if text:
            parts.append((text, *self._prefill_text([prompts[i] for i in text])))
        for i, p in enumerate(prompts):
            if p.extra:
                parts.append(([i], *self._prefill_image(p)))
        if len(parts) == 1:
            return parts[0][1], parts[0][2]
        order = [i for rows, _, _ in parts for i in rows]
        batch: Batch | None = None
        for _, _, b in parts:
            batch = merge(batch, b)
        assert batch is not None
        logits = torch.cat([lg for _, lg, _ in parts])
        back = [order.index(i) for i in range(len(prompts))]
        index = torch.as_tensor(back, dtype=torch.long, device=logits.device)
        return logits[index], select(batch, back)

    def _prefill_text(self, prompts: Sequence[Prompt]) -> tuple[torch.Tensor, Batch]:
        width = max(len(p.ids) for p in prompts)
        ids = torch.full((len(prompts), width), 0, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - len(p.ids) :] = torch.as_tensor(p.ids, dtype=torch.long)
            mask[row, width - len(p.ids) :] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        ids, mask, positions = (t.to(self.device) for t in (ids, mask, positions))
        cache = DynamicCache(config=self.model.config)
        out = self._forward(
            input_ids=ids,
            attention_mask=mask,
            position_ids=self._rope(positions),
            cache=cache,
            logits_to_keep=1,
        )
        offsets = torch.zeros(len(prompts), dtype=torch.long, device=self.device)
        return out.logits[:, -1, :].float(), Batch(cache, mask, offsets)

    def _prefill_image(self, prompt: Prompt) -> tuple[torch.Tensor, Batch]:
        """Qwen-VL: positions from the model's own rope index, kept per row as an offset
        (the text after an image is positioned behind its token count)."""
        ids = torch.as_tensor([prompt.ids], dtype=torch.long, device=self.device)
        mask = torch.ones_like(ids)
        grid = torch.as_tensor(prompt.extra["image_grid_thw"], device=self.device)
        pixels = torch.as_tensor(prompt.extra["pixel_values"], device=self.device)
        token_types = (ids == self.image_token).to(torch.int32)
        positions, deltas = self.model.model.get_rope_index(
            ids, mm_token_type_ids=token_types, image_grid_thw=grid, attention_mask=mask
        )
        cache = DynamicCache(config=self.model.config)
        out = self._forward(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            pixel_values=pixels.to(self.model.dtype),
            image_grid_thw=grid,
            mm_token_type_ids=token_types,
            cache=cache,
            logits_to_keep=1,
        )
        offsets = deltas.view(1).to(torch.long)
        return out.logits[:, -1, :].float(), Batch(cache, mask, offsets)

    def _rope(self, positions: torch.Tensor) -> torch.Tensor:
        """(rows, n) positions, as three identical rows for a multimodal-rope model."""
        if self.image_processor is None:
            return positions
        return positions.unsqueeze(0).expand(3, *positions.shape)

    def decode(self, batch: Batch, tokens: torch.Tensor) -> torch.Tensor:
        """See ``ChatBackend.decode``: the new mask column is kept only on success."""
        positions = (batch.mask.sum(dim=1) + batch.offsets).unsqueeze(1)
        mask = torch.cat([batch.mask, batch.mask.new_ones((batch.rows, 1))], dim=1)
        out = self._forward(
            input_ids=tokens.to(self.device).unsqueeze(1),
            attention_mask=mask,
            position_ids=self._rope(positions),
            cache=batch.cache,
        )
        batch.mask = mask
        return out.logits[:, -1, :].float()  # type: ignore[no-any-return]

    # -- text ---------------------------------------------------------------------------

    def text(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def token_text(self, token: int) -> str:
        return str(self.tokenizer.decode([token], skip_special_tokens=False))


def _flat_text(content: Any) -> str:
    """A text model's content as one string (text parts joined)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(str(p.get("text", "")) for p in content if p.get("type") == "text")


def _picture(data: bytes) -> Any:
    """Image bytes (checked by ``tasks.media.images`` before they got here) as an RGB image."""
    from PIL import Image

    from tasks.media.images import OPEN_FORMATS

    try:  # the same decoders the check allowed, never Pillow's whole plugin list
        with Image.open(io.BytesIO(data), formats=OPEN_FORMATS) as image:
            return image.convert("RGB")
    except Exception as exc:
        raise InvalidRequest("an image could not be decoded", param="messages") from exc
