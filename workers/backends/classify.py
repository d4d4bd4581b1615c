"""Text classifiers for classify: class probabilities per text, equal to what transformers'
``pipeline("text-classification", top_k=None)`` gives on the same model.

The pipeline's activation: none for ``problem_type`` regression; a sigmoid per class for
multi-label classification or a single-logit model; a softmax otherwise. The class names
are the config's ``id2label``, or the catalog's ``labels``. A model with neither (its
``id2label`` is transformers' generic ``LABEL_0``, ``LABEL_1``, ... as it is for a config
that names none) loads, with a warning, and answers each request with a 400: its answers
would name classes nobody defined.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from tasks.contracts.classify import ClassifyOptions
from tasks.errors import InvalidRequest
from workers.backends.sequence_classification import SequenceClassificationBackend

log = logging.getLogger(__name__)


def generic_labels(names: Sequence[str]) -> bool:
    """Whether ``names`` are transformers' defaults, the names of no class."""
    return all(name == f"LABEL_{i}" for i, name in enumerate(names))


class ClassifierBackend(SequenceClassificationBackend):
    capabilities = ("classify",)

    def configure(self, config: Any) -> None:
        options = ClassifyOptions.of(self.entry)
        count = int(config.num_labels)
        names = options.labels or tuple(str(config.id2label[i]) for i in range(count))
        if len(names) != count:
            raise ValueError(
                f"model {self.entry.id!r} has {count} classes, its catalog entry names "
                f"{len(names)} labels"
            )
        self.labels: tuple[str, ...] | None = None if generic_labels(names) else names
        if self.labels is None:
            log.warning(
                "model %s names no classes (id2label %s); classify requests to it are "
                "refused until its catalog entry sets `labels`",
                self.entry.id,
                ", ".join(names),
            )
        problem = getattr(config, "problem_type", None)
        self.activation = (
            "none"
            if problem == "regression"
            else "sigmoid"
            if problem == "multi_label_classification" or count == 1
            else "softmax"
        )
        self.truncate = options.truncate

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        if self.activation == "softmax":
            return torch.softmax(logits, dim=-1)
        return torch.sigmoid(logits) if self.activation == "sigmoid" else logits

    def texts(self, inputs: Sequence[str]) -> list[list[int]]:
        """The texts' token sequences; a 400 for a model without labels, and (without
        ``truncate`` in the catalog) for a text over the context."""
        if self.labels is None:
            raise InvalidRequest(
                f"model {self.entry.id!r} has no class labels (its config's id2label holds "
                "only the generic LABEL_0, LABEL_1, ...), so it cannot classify; set "
                "`labels` in its catalog entry",
                param="model",
            )
        seqs = self.encode(inputs)
        self.check_lengths(seqs, "input[{}]", "input")
        return seqs
