"""The classify capability on the worker: live requests and Batch API lines, on the
scoring engine (``workers/scoring.py``) over sequence-classification models.

A live request comes as the API checked it (``model`` and the texts) and its reply is the
response's ``data`` array (labels and probabilities: the worker knows the labels); a
Batch API line is checked here with the same contract and answered with the whole
response body.
"""

from __future__ import annotations

import time
from typing import Any

from configs.catalog import Catalog
from tasks.contracts.classify import (
    ClassificationRequest,
    classification_body,
    classification_data,
    input_texts,
    parse_body,
    served_entry,
)
from tasks.errors import InvalidRequest
from workers.backends.classify import ClassifierBackend
from workers.scoring import Scored, ScoringBackend, ScoringCapability

Checked = tuple[ClassificationRequest, list[str]]  # a line's request and its texts


def _classifier(backend: ScoringBackend) -> ClassifierBackend:
    if not isinstance(backend, ClassifierBackend):
        raise InvalidRequest(f"model {backend.entry.id!r} is not a classifier", param="model")
    return backend


def _live_texts(backend: ScoringBackend, request: dict[str, Any]) -> list[list[int]]:
    """A live request's texts (the API normalised ``input`` to a list of them)."""
    texts = request.get("input")
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise InvalidRequest("malformed live classify request", param="input")
    return _classifier(backend).texts(texts)


def _data(backend: ScoringBackend, result: Scored) -> list[dict[str, Any]]:
    labels = _classifier(backend).labels or ()
    return classification_data(labels, [row.tolist() for row in result.rows])


def _check(catalog: Catalog, served: list[str], body: dict[str, Any]) -> Checked:
    request = parse_body(body)
    return request, input_texts(request, served_entry(catalog, served, request.model))


def _line_texts(backend: ScoringBackend, line: Checked) -> list[list[int]]:
    return _classifier(backend).texts(line[1])


def _respond(
    backend: ScoringBackend, line: Checked, result: Scored, request_id: str
) -> dict[str, Any]:
    data = _data(backend, result)
    return classification_body(
        f"classify-{request_id}", line[0].model, int(time.time()), data, result.prompt_tokens
    )


CLASSIFY = ScoringCapability(ClassifierBackend, _live_texts, _data, _check, _line_texts, _respond)
# the capability registry's entry points
make_engine = CLASSIFY.make_engine
live_handler = CLASSIFY.live_handler
batch_executor = CLASSIFY.batch_executor
