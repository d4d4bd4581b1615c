"""Cross-encoders for rerank: one score per (query, document) pair, equal to what
sentence-transformers' ``CrossEncoder.predict`` gives on the same model.

``CrossEncoder.predict`` applies an activation to the model's one logit: the one the
model's config names (``sentence_transformers.activation_fn``, or the older
``sbert_ce_default_activation_function``) when it is a ``torch.nn`` module class, else a
sigmoid (its default for ``num_labels == 1``). A path outside ``torch.nn`` would need
``trust_remote_code``, which laneway never sets, so, as ``CrossEncoder`` does then, the
sigmoid; a config naming anything but an ``nn.Module`` class gets the sigmoid too.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from tasks.contracts.rerank import RerankOptions
from tasks.errors import ContextLengthExceeded
from workers.backends.sequence_classification import SequenceClassificationBackend

log = logging.getLogger(__name__)


def activation_of(config: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation ``CrossEncoder`` applies to this model's logits."""
    settings = getattr(config, "sentence_transformers", None) or {}
    path = settings.get("activation_fn") if isinstance(settings, dict) else None
    path = path or getattr(config, "sbert_ce_default_activation_function", None)
    if isinstance(path, str) and path.startswith("torch.nn."):
        module, _, name = path.rpartition(".")
        with contextlib.suppress(ImportError):
            found = getattr(importlib.import_module(module), name, None)
            # a model's config names it: only an activation module, never any callable
            if isinstance(found, type) and issubclass(found, torch.nn.Module):
                return found()  # type: ignore[no-any-return]
    if path:
        log.warning("activation %r is not a torch class: using the sigmoid", path)
    return torch.sigmoid


class CrossEncoderBackend(SequenceClassificationBackend):
    capabilities = ("rerank",)

    def configure(self, config: Any) -> None:
        if int(config.num_labels) != 1:
            raise ValueError(
                f"model {self.entry.id!r} has {config.num_labels} labels; a reranker "
                "(cross-encoder) has one: serve it with capability classify instead"
            )
        self.activation = activation_of(config)
        self.truncate = RerankOptions.of(self.entry).truncate

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        return self.activation(logits)[:, 0]

    def pairs(self, query: str, documents: Sequence[str]) -> list[list[int]]:
        """The (query, document) pairs' token sequences; without ``truncate`` in the
        catalog, a 400 when the query alone, or a pair, is over the context."""
        limit = self.max_input_tokens
        if not self.truncate:
            query_ids = self.tokenizer(query, add_special_tokens=False)["input_ids"]
            framed = len(query_ids) + self.special_tokens(pair=True)
            if framed > limit:
                raise ContextLengthExceeded(
                    f"This model's maximum context length is {limit} tokens, however the "
                    f"query alone has {framed} tokens (with the special tokens of a pair). "
                    "Please reduce the length of the query.",
                    param="query",
                )
        seqs = self.encode([query] * len(documents), documents)
        self.check_lengths(seqs, "the query with documents[{}]", "documents")
        return seqs
