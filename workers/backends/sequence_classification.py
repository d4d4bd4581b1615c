"""Sequence-classification models (``AutoModelForSequenceClassification``): one forward
gives each input (a text, or a pair of texts) its logits. Two capabilities run on them:
rerank (a cross-encoder scores (query, document) pairs) and classify (labels for a text),
both on the scoring engine (``workers/scoring.py``).

The backend is a ``Forwarder`` for the token-budget ``Batcher`` (``workers/batching.py``),
which batches token-id sequences and nothing else. A pair's second text has its own
segment (``token_type_ids`` 1 for BERT-style models), so where the tokenizer returns
segments they travel inside the ids: a token of segment ``s`` is sent as
``id + s * stride`` (``stride`` = the tokenizer's size, above every id) and ``forward``
splits them again. The length of a sequence is its token count either way.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tasks.errors import ContextLengthExceeded
from workers.backends.torch_dtype import torch_dtype
from workers.scoring import ScoringBackend

log = logging.getLogger(__name__)


class SequenceClassificationBackend(ScoringBackend):
    """Texts or text pairs to token sequences (``encode``), and token sequences to one
    activated output each in one forward pass (``forward``); what the activation is
    belongs to the capability (``activate``)."""

    tokenizer: Any
    model: Any
    # cut inputs over max_input_tokens instead of refusing them (the capability's option)
    truncate = False

    def load(self) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        dtype = torch_dtype(self.entry.dtype, self.device)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            self.model_path, dtype=dtype
        )
        self.model.to(self.device).eval()
        self.pad_id = int(self.tokenizer.pad_token_id or 0)
        self.segments = "token_type_ids" in self.tokenizer.model_input_names
        self.stride = len(self.tokenizer)
        self.configure(self.model.config)
        log.info("loaded %s on %s (%s)", self.entry.id, self.device, dtype)

    @abstractmethod
    def configure(self, config: Any) -> None:
        """Read what the capability needs of the model's config (raise when unfit)."""

    @abstractmethod
    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        """The outputs of float32 logits (batch, num_labels)."""

    def encode(self, first: Sequence[str], second: Sequence[str] | None = None) -> list[list[int]]:
        """Token sequences (special tokens included) of texts, or of (first, second) pairs;
        cut to ``max_input_tokens`` (longest first, as sentence-transformers and the
        text-classification pipeline cut) only when ``truncate``."""
        enc = self.tokenizer(
            list(first),
            list(second) if second is not None else None,
            add_special_tokens=True,
            truncation="longest_first" if self.truncate else False,
            max_length=self.max_input_tokens if self.truncate else None,
        )
        if not self.segments:
            return [list(ids) for ids in enc["input_ids"]]
        stride = self.stride
        return [
            [t + s * stride for t, s in zip(ids, types, strict=True)]
            for ids, types in zip(enc["input_ids"], enc["token_type_ids"], strict=True)
        ]

    def special_tokens(self, *, pair: bool) -> int:
        return int(self.tokenizer.num_special_tokens_to_add(pair=pair))

    def check_lengths(self, seqs: Sequence[Sequence[int]], what: str, param: str) -> None:
        """A 400 for the first sequence over ``max_input_tokens`` (``what`` names it, given
        its index)."""
        limit = self.max_input_tokens
        for i, seq in enumerate(seqs):
            if len(seq) > limit:
                raise ContextLengthExceeded(
                    f"This model's maximum context length is {limit} tokens, however "
                    f"{what.format(i)} has {len(seq)} tokens. Please reduce the length of "
                    "the input.",
                    param=param,
                )

    @torch.inference_mode()
    def forward(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        rows = [torch.as_tensor(seq, dtype=torch.long) for seq in batch]
        ids = pad_sequence(rows, batch_first=True, padding_value=self.pad_id)
        lengths = torch.as_tensor([len(seq) for seq in batch])
        inputs = {"attention_mask": (torch.arange(ids.shape[1]) < lengths[:, None]).long()}
        if self.segments:
            inputs["token_type_ids"] = ids // self.stride
            ids = ids % self.stride
        inputs["input_ids"] = ids
        logits = self.model(**{k: v.to(self.device) for k, v in inputs.items()}).logits
        return self.activate(logits.float()).cpu().numpy()

    def warmup(self) -> None:
        # the first call sets the tokenizer's truncation, once: set again while another
        # thread (live and batch work tokenize on two) encodes, it would fail that call
        self.encode(["warm"], ["up"])
        for n, length in ((1, 8), (8, 32), (2, min(self.max_input_tokens, 128))):
            self.forward([[self.pad_id] * length] * n)
        self.warm = True
