"""Rerank against a real stack: Redis, a rerank worker process, the database and the API,
serving a tiny random-weight cross-encoder built here, called over HTTP with httpx (the
official ``openai`` client has no rerank). Scores equal sentence-transformers'
``CrossEncoder.predict`` on the same weights, live and through the Batch API; every bad
input is an OpenAI-shaped 400 and the worker keeps serving."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.harness import Stack
from tests.integration.helpers import assert_openai_error
from tests.sequence_models import batch_against_live, build_cross_encoder, entry, serving

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CE = "test/tiny-cross-encoder"
CUT = "test/tiny-cross-encoder-truncating"  # the same weights, pairs cut to the context
EMBED = "laneway/fake-embeddings"  # served, without a worker: for the capability checks
MAX_DOCUMENTS = 8
CONTEXT = 64
QUERY = "what is the capital of france"
DOCS = [
    "paris is the capital and largest city of france",
    "dogs are loyal animals",
    "berlin is the capital of germany",
    "the eiffel tower stands in paris",
    "",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_cross_encoder(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Stack]:
    entries = [
        entry(CE, "rerank", model_dir, max_input_tokens=CONTEXT, max_documents=MAX_DOCUMENTS),
        entry(CUT, "rerank", model_dir, max_input_tokens=CONTEXT, truncate=True),
    ]
    root = tmp_path_factory.mktemp("rerank-stack")
    with serving(root, "rerank", entries, [CE, CUT, EMBED]) as stack:
        yield stack


@pytest.fixture(scope="module")
def predict(model_dir: Path) -> Any:
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(model_dir), device="cpu").predict


def rerank(http: httpx.Client, **body: Any) -> httpx.Response:
    return http.post("/v1/rerank", json={"model": CE, "query": QUERY, "documents": DOCS, **body})


def pair_tokens(model_dir: Path, query: str, docs: list[str]) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return sum(len(ids) for ids in tok([query] * len(docs), docs)["input_ids"])


def assert_still_serving(http: httpx.Client) -> None:
    response = rerank(http, top_n=1)
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["index"] in range(len(DOCS))


def test_scores_equal_cross_encoder_predict(
    http: httpx.Client, predict: Any, model_dir: Path
) -> None:
    response = rerank(http)
    assert response.status_code == 200, response.text
    out = response.json()
    assert set(out) == {"id", "model", "results", "usage"}
    assert out["id"].startswith("rerank-") and out["model"] == CE
    reference = predict([(QUERY, d) for d in DOCS])
    results = out["results"]
    assert sorted(r["index"] for r in results) == list(range(len(DOCS)))
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    for r in results:
        assert abs(r["relevance_score"] - float(reference[r["index"]])) < 1e-5
        assert r["document"] == {"text": DOCS[r["index"]]}
    tokens = pair_tokens(model_dir, QUERY, DOCS)
    assert out["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_top_n_objects_and_no_documents(http: httpx.Client, predict: Any) -> None:
    docs = [{"text": d, "title": "ignored"} for d in DOCS]
    out = rerank(http, documents=docs, top_n=2, return_documents=False).json()
    best = np.argsort(-predict([(QUERY, d) for d in DOCS]), kind="stable")[:2]
    assert [r["index"] for r in out["results"]] == best.tolist()
    assert all(set(r) == {"index", "relevance_score"} for r in out["results"])


def test_truncating_model_scores_long_pairs_as_cross_encoder(
    http: httpx.Client, model_dir: Path
) -> None:
    from sentence_transformers import CrossEncoder

    docs = ["paris " * 100, "a short document"]
    response = http.post("/v1/rerank", json={"model": CUT, "query": QUERY, "documents": docs})
    assert response.status_code == 200, response.text
    reference = CrossEncoder(str(model_dir), device="cpu", max_length=CONTEXT).predict(
        [(QUERY, d) for d in docs]
    )
    for r in response.json()["results"]:
        assert abs(r["relevance_score"] - float(reference[r["index"]])) < 1e-5
    assert response.json()["usage"]["prompt_tokens"] <= 2 * CONTEXT


LONG = "word " * (CONTEXT + 10)


@pytest.mark.parametrize(
    ("body", "param", "contains"),
    [
        ({"documents": []}, "documents", "must not be empty"),
        ({"documents": ["d"] * (MAX_DOCUMENTS + 1)}, "documents", f"at most {MAX_DOCUMENTS}"),
        ({"top_n": 0}, "top_n", "between 1 and the number of documents"),
        ({"top_n": -1}, "top_n", "got -1"),
        ({"top_n": len(DOCS) + 1}, "top_n", f"got {len(DOCS) + 1}"),
        ({"query": LONG}, "query", f"maximum context length is {CONTEXT} tokens"),
        ({"documents": ["fits", LONG]}, "documents", "documents[1] has"),
        ({"query": None}, "query", None),
        ({"query": 7}, "query", None),
        ({"documents": None}, "documents", None),
        ({"documents": "a string"}, "documents", None),
        ({"documents": [None]}, "documents", None),
        ({"documents": [{"title": "no text"}]}, "documents", None),
        ({"top_n": "2"}, "top_n", None),
        ({"return_documents": None}, "return_documents", None),
        ({"model": None}, "model", None),
    ],
)
def test_bad_inputs_are_openai_400s(
    http: httpx.Client, body: dict[str, Any], param: str, contains: str | None
) -> None:
    error = assert_openai_error(rerank(http, **body), 400, param=param, contains=contains)
    if contains and "context length" in contains:
        assert error["code"] == "context_length_exceeded"
        assert str(CONTEXT + 10 + 3) in error["message"]  # the words and the special tokens
    assert_still_serving(http)


def test_bodies_that_are_not_requests(http: httpx.Client) -> None:
    assert_openai_error(http.post("/v1/rerank", content=b"{not json"), 400, param=None)
    assert_openai_error(http.post("/v1/rerank", json=["a"]), 400, contains="JSON object")
    assert_openai_error(http.post("/v1/rerank", json={"query": "q"}), 400, param="model")
    assert_still_serving(http)


def test_models_of_other_capabilities(http: httpx.Client) -> None:
    response = http.post("/v1/embeddings", json={"model": CE, "input": "hello"})
    assert_openai_error(response, 400, param="model", contains="is a rerank model")
    response = rerank(http, model=EMBED)
    assert_openai_error(response, 400, param="model", contains="not a rerank model")
    assert_openai_error(rerank(http, model="no/such-model"), 404, param="model")
    assert_still_serving(http)


def test_batch_lines_equal_live_answers(stack: Stack) -> None:
    good: list[dict[str, Any]] = [
        {"model": CE, "query": QUERY, "documents": DOCS},
        {"model": CE, "query": "dogs", "documents": DOCS[:3], "top_n": 1},
        {"model": CE, "query": QUERY, "documents": [{"text": d} for d in DOCS[:2]]},
    ]
    bad: list[tuple[dict[str, Any], str]] = [
        ({"model": CE, "query": QUERY, "documents": DOCS, "top_n": 0}, "top_n"),
        ({"model": CE, "query": QUERY, "documents": ["fits", LONG]}, "documents"),
        ({"model": CE, "query": None, "documents": DOCS}, "query"),
    ]
    for line, live in batch_against_live(stack, "/v1/rerank", good, bad):
        assert line["id"].startswith("rerank-") and line["model"] == CE
        assert [r["index"] for r in line["results"]] == [r["index"] for r in live["results"]]
        for a, b in zip(line["results"], live["results"], strict=True):
            assert abs(a["relevance_score"] - b["relevance_score"]) < 1e-5
            assert a.get("document") == b.get("document")
        assert line["usage"] == live["usage"]
