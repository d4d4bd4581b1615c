"""The rerank capability on the worker: live requests and Batch API lines, on the
scoring engine (``workers/scoring.py``) over sequence-classification models.

A live request comes as the API checked it (``model``, ``query``, the documents' texts)
and its reply is the documents' scores in input order (a JSON array); the API sorts them
and writes the response. A Batch API line is checked here with the same contract and
answered with the whole response body.
"""

from __future__ import annotations

from typing import Any

from configs.catalog import Catalog
from tasks.contracts.rerank import (
    RerankRequest,
    document_texts,
    parse_body,
    rerank_body,
    served_entry,
)
from tasks.errors import InvalidRequest
from workers.backends.rerank import CrossEncoderBackend
from workers.scoring import Scored, ScoringBackend, ScoringCapability

Checked = tuple[RerankRequest, list[str]]  # a line's request and its documents' texts


def _reranker(backend: ScoringBackend) -> CrossEncoderBackend:
    if not isinstance(backend, CrossEncoderBackend):
        raise InvalidRequest(f"model {backend.entry.id!r} is not a reranker", param="model")
    return backend


def _live_pairs(backend: ScoringBackend, request: dict[str, Any]) -> list[list[int]]:
    """A live request's pairs (the API normalised the documents to their texts)."""
    query, docs = request.get("query"), request.get("documents")
    if not (isinstance(query, str) and isinstance(docs, list)) or not all(
        isinstance(d, str) for d in docs
    ):
        raise InvalidRequest("malformed live rerank request", param="documents")
    return _reranker(backend).pairs(query, docs)


def _scores(_backend: ScoringBackend, result: Scored) -> list[float]:
    return [float(score) for score in result.rows]


def _check(catalog: Catalog, served: list[str], body: dict[str, Any]) -> Checked:
    request = parse_body(body)
    return request, document_texts(request, served_entry(catalog, served, request.model))


def _line_pairs(backend: ScoringBackend, line: Checked) -> list[list[int]]:
    return _reranker(backend).pairs(line[0].query, line[1])


def _respond(
    backend: ScoringBackend, line: Checked, result: Scored, request_id: str
) -> dict[str, Any]:
    request, texts = line
    scores = _scores(backend, result)
    return rerank_body(
        f"rerank-{request_id}", request.model, request, texts, scores, result.prompt_tokens
    )


RERANK = ScoringCapability(CrossEncoderBackend, _live_pairs, _scores, _check, _line_pairs, _respond)
# the capability registry's entry points
make_engine = RERANK.make_engine
live_handler = RERANK.live_handler
batch_executor = RERANK.batch_executor
