"""Embeddings on Hugging Face transformers, pooled as the sentence-transformers config says."""

from __future__ import annotations

import json
import logging
from abc import abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from tasks.errors import ContextLengthExceeded, InvalidRequest
from workers.backends.base import ModelBackend
from workers.backends.torch_dtype import torch_dtype

log = logging.getLogger(__name__)


def read_pooling(model_path: str) -> tuple[str, bool]:
    """(pooling mode, normalize) from a sentence-transformers layout; mean+normalize if absent."""
    root = Path(model_path)
    mode, normalize = "mean", True
    modules_file = root / "modules.json"
    if not modules_file.is_file():
        return mode, normalize
    modules = json.loads(modules_file.read_text())
    normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
    for module in modules:
        if module.get("type", "").endswith("Pooling"):
            cfg = json.loads((root / module["path"] / "config.json").read_text())
            if cfg.get("pooling_mode_cls_token"):
                mode = "cls"
            elif cfg.get("pooling_mode_lasttoken"):
                mode = "last"
            elif cfg.get("pooling_mode_mean_tokens"):
                mode = "mean"
    return mode, normalize


class EmbeddingBackend(ModelBackend):
    """An embeddings model: inputs to token sequences (``tokenize``), and token sequences
    to one vector each in one forward pass (``forward``). Batching, caching, priority and
    cancellation are the engine's (``workers/embeddings_engine.py``)."""

    capabilities = ("embeddings",)

    @property
    @abstractmethod
    def dimensions(self) -> int: ...

    @abstractmethod
    def tokenize(self, inputs: Sequence[str | Sequence[int]]) -> list[list[int]]:
        """Token ids (special tokens included) for each input; no truncation."""

    @abstractmethod
    def forward(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        """One forward over the batch: float32 array (len(batch), dimensions), in order."""

    def warmup(self) -> None:
        for n, length in ((1, 8), (8, 32), (2, min(self.max_input_tokens, 128))):
            self.forward([[1] * length] * n)
        self.warm = True

    def check_lengths(self, token_seqs: Sequence[Sequence[int]], *, param: str = "input") -> None:
        for i, seq in enumerate(token_seqs):
            if len(seq) > self.max_input_tokens:
                raise ContextLengthExceeded(
                    f"This model's maximum context length is {self.max_input_tokens} tokens, "
                    f"however input[{i}] has {len(seq)} tokens. Please reduce the length of "
                    "the input.",
                    param=param,
                )
            if not seq:
                raise InvalidRequest(f"input[{i}] is empty", param=param)


class TransformersEmbeddingBackend(EmbeddingBackend):
    tokenizer: Any
    model: Any

    def load(self) -> None:
        dtype = torch_dtype(self.entry.dtype, self.device)
        self.model = AutoModel.from_pretrained(self.model_path, dtype=dtype)
        self.model.to(self.device).eval()
        self._load_text_side(self.model.config)
        log.info(
            "loaded %s on %s (%s, pooling=%s)", self.entry.id, self.device, dtype, self.pooling
        )

    def _load_text_side(self, config: Any) -> None:
        """Pooling, tokenizer and the sizes ``tokenize`` checks against, from the model's
        config: all but the model itself (other runtimes' backends reuse it)."""
        self.pooling, self.normalize = read_pooling(self.model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.pad_id = int(self.tokenizer.pad_token_id or 0)
        self.vocab_size = int(config.vocab_size)
        self._dim = int(config.hidden_size)
        self.prefix, self.suffix = self._special_tokens()

    def _special_tokens(self) -> tuple[list[int], list[int]]:
        """What the tokenizer adds around a text, so token inputs get the same framing."""
        bare = list(self.tokenizer("laneway", add_special_tokens=False)["input_ids"])
        framed = list(self.tokenizer("laneway", add_special_tokens=True)["input_ids"])
        for start in range(len(framed) - len(bare) + 1):
            if framed[start : start + len(bare)] == bare:
                return framed[:start], framed[start + len(bare) :]
        return [], []

    @property
    def dimensions(self) -> int:
        return self._dim

    def tokenize(self, inputs: Sequence[str | Sequence[int]]) -> list[list[int]]:
        texts = [x for x in inputs if isinstance(x, str)]
        encoded = iter(
            self.tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
            if texts
            else []
        )
        out: list[list[int]] = []
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                out.append(list(next(encoded)))
                continue
            bad = [t for t in item if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequest(
                    f"input[{i}] has token id {bad[0]} outside the vocabulary "
                    f"(0..{self.vocab_size - 1})",
                    param="input",
                )
            # token inputs are vocabulary ids without special tokens: add them as text would
            out.append([*self.prefix, *item, *self.suffix])
        return out

    @torch.inference_mode()
    def forward(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        longest = max(len(seq) for seq in batch)
        ids = torch.full((len(batch), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.pooling == "last":
            last = mask.sum(dim=1) - 1
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        else:
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        pooled = pooled.float()
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.cpu().numpy()
