"""The rerank request contract (``POST /v1/rerank``), shared by the API (live calls, before
enqueue) and the workers (Batch API lines): one schema, one set of rules, one response.

The shape is the one vLLM, Jina and text-embeddings-inference's OpenAI-style servers
answer: ``query``, ``documents`` (strings, or objects with a ``text``), ``top_n`` and
``return_documents``; results ``{index, relevance_score, document: {text}}`` sorted by
score, best first, and ``usage``. Where those servers are lenient we answer 400 instead
(the caller learns of the mistake): a ``top_n`` below 1 or above the number of documents.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from configs.catalog import Catalog, CatalogEntry, CatalogOptions
from tasks.contracts import base as contract
from tasks.contracts.base import EngineCounter, Rolling, check_count, check_text, text_tokens
from tasks.errors import InvalidRequest, invalid_request

CAPABILITY = "rerank"
ENDPOINT = "/v1/rerank"

# the scoring engine reports only what every engine does (forwards, waits)
ENGINE_COUNTERS: tuple[EngineCounter, ...] = ()
ROLLING = Rolling(requests=True)  # an item is one document scored


class RerankOptions(CatalogOptions):
    """A reranker's catalog options (``defaults:`` of its entry)."""

    # documents one request may rank at most
    max_documents: Annotated[StrictInt, Field(ge=1)] = 1000
    # a (query, document) pair over max_input_tokens: False, a 400 naming the document;
    # True, cut the way sentence-transformers' CrossEncoder cuts (longest first)
    truncate: StrictBool = False


OPTIONS = RerankOptions


def estimate_tokens(payload: Mapping[str, Any]) -> int:
    """The tokens a live request may use: every document paired with the query."""
    query = payload.get("query")
    query_chars = len(query) if isinstance(query, str) else 0
    docs = [d for d in payload.get("documents") or () if isinstance(d, str)]
    return text_tokens(sum(query_chars + len(d) for d in docs))


# one pydantic error per member of the union says less than this
FIELD_HINTS = {
    "documents": "Invalid value for 'documents': expected a list of strings or of objects "
    "with a 'text' string.",
}


class TextDocument(BaseModel):
    model_config = ConfigDict(extra="ignore")

    text: StrictStr


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    query: StrictStr
    documents: list[StrictStr | TextDocument]
    # None: every document; else the best top_n (1 .. number of documents)
    top_n: StrictInt | None = None
    return_documents: StrictBool = True
    user: StrictStr | None = None


def parse_body(body: Any) -> RerankRequest:
    """A request body (live or a Batch API line's) as a request, or the 400 saying why not."""
    try:
        return RerankRequest.model_validate(body)
    except ValidationError as exc:
        raise invalid_request(exc.errors(), FIELD_HINTS) from None


def served_entry(catalog: Catalog, served: list[str], model: str) -> CatalogEntry:
    return contract.served_entry(catalog, served, model, CAPABILITY)


def document_texts(request: RerankRequest, entry: CatalogEntry) -> list[str]:
    """The documents' texts, after every rule a request meets before it is tokenized:
    a query, 1 .. ``max_documents`` documents, a ``top_n`` within them."""
    if not request.query:
        raise InvalidRequest("'query' must not be empty", param="query")
    check_text(request.query, "'query'", "query")
    texts = [d if isinstance(d, str) else d.text for d in request.documents]
    check_count(len(texts), RerankOptions.of(entry).max_documents, "documents")
    for i, text in enumerate(texts):
        check_text(text, f"documents[{i}]", "documents")
    top_n = request.top_n
    if top_n is not None and not 1 <= top_n <= len(texts):
        raise InvalidRequest(
            f"'top_n' must be between 1 and the number of documents ({len(texts)}); got {top_n}",
            param="top_n",
        )
    return texts


def rerank_body(
    response_id: str,
    model: str,
    request: RerankRequest,
    texts: Sequence[str],
    scores: Sequence[float],
    prompt_tokens: int,
) -> dict[str, Any]:
    """The response: the documents by score, best first (equal scores in input order),
    the best ``top_n`` of them, each with its text when ``return_documents``."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[: request.top_n]
    results: list[dict[str, Any]] = []
    for i in order:
        result: dict[str, Any] = {"index": i, "relevance_score": float(scores[i])}
        if request.return_documents:
            result["document"] = {"text": texts[i]}
        results.append(result)
    return {
        "id": response_id,
        "model": model,
        "results": results,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


BENCH_DOCUMENTS = 4  # documents per benchmark request
BENCH_QUERY_TOKENS = 8


def bench_request(
    model: str, *, input_tokens: int, output_tokens: int, clip: bytes | None, seq: int
) -> contract.BenchRequest:
    """`laneway benchmark`'s request: a short query and ``BENCH_DOCUMENTS`` documents of
    about ``input_tokens`` tokens together (each pair stays well inside the context),
    different for every ``seq``; input tokens per second, as ``usage.prompt_tokens``
    counts them (every pair's)."""
    each = max(1, input_tokens // BENCH_DOCUMENTS)
    documents = [
        contract.bench_text(each, seq * BENCH_DOCUMENTS + i) for i in range(BENCH_DOCUMENTS)
    ]
    prompt_tokens = contract.usage_of("prompt_tokens")
    return contract.BenchRequest(
        path=ENDPOINT,
        unit="tokens",
        units=prompt_tokens,
        json={
            "model": model,
            "query": contract.bench_text(BENCH_QUERY_TOKENS, seq),
            "documents": documents,
            "return_documents": False,
        },
        input_tokens=prompt_tokens,
    )
