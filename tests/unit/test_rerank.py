"""Rerank: the contract's rules (shared by the live route and Batch API lines), the
response shape, and the cross-encoder backend's scores against sentence-transformers'
``CrossEncoder.predict`` on a tiny model built here."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from configs.catalog import CatalogEntry, CatalogError, validate_options
from tasks.contracts.rerank import (
    RerankOptions,
    document_texts,
    estimate_tokens,
    parse_body,
    rerank_body,
)
from tasks.errors import ContextLengthExceeded, InvalidRequest
from tests.sequence_models import build_cross_encoder, catalog_entry, loaded
from workers.backends.rerank import CrossEncoderBackend, activation_of

QUERY = "what is the capital of france"
DOCS = [
    "paris is the capital and largest city of france",
    "dogs are loyal animals",
    "[SEP] a document holding the separator token",
    "berlin is the capital of germany",
    "",
]


def entry(**defaults: Any) -> CatalogEntry:
    return catalog_entry("rerank", Path("/ce"), **defaults)  # type: ignore[no-any-return]


def body(**kw: Any) -> dict[str, Any]:
    return {"model": "test/ce", "query": QUERY, "documents": ["a", "b", "c"], **kw}


# -- the contract ------------------------------------------------------------------------


def test_documents_as_strings_or_objects_with_text() -> None:
    request = parse_body(body(documents=["a", {"text": "b", "title": "ignored"}]))
    assert document_texts(request, entry()) == ["a", "b"]


@pytest.mark.parametrize(
    ("changes", "param", "needle"),
    [
        ({"documents": []}, "documents", "must not be empty"),
        ({"documents": ["x"] * 4}, "documents", "at most 3"),
        ({"top_n": 0}, "top_n", "between 1 and the number of documents (3); got 0"),
        ({"top_n": -1}, "top_n", "got -1"),
        ({"top_n": 4}, "top_n", "got 4"),
        ({"query": ""}, "query", "'query' must not be empty"),
        ({"query": "\ud800"}, "query", "lone surrogate"),
        ({"documents": ["ok", "\udfff"]}, "documents", "documents[1] is not valid Unicode"),
    ],
)
def test_rules_before_tokenizing(changes: dict[str, Any], param: str, needle: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        document_texts(parse_body(body(**changes)), entry(max_documents=3))
    assert info.value.param == param and info.value.status_code == 400
    assert needle in info.value.message


@pytest.mark.parametrize(
    ("changes", "param"),
    [
        ({"query": None}, "query"),
        ({"query": ["a"]}, "query"),
        ({"documents": None}, "documents"),
        ({"documents": "one string"}, "documents"),
        ({"documents": [1, 2]}, "documents"),
        ({"documents": [{"title": "no text"}]}, "documents"),
        ({"documents": [None]}, "documents"),
        ({"top_n": "2"}, "top_n"),
        ({"top_n": 1.5}, "top_n"),
        ({"top_n": True}, "top_n"),
        ({"return_documents": "yes"}, "return_documents"),
        ({"model": None}, "model"),
    ],
)
def test_wrong_types_and_nulls_are_400s(changes: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_body(body(**changes))
    assert info.value.param == param and info.value.status_code == 400


def test_missing_fields_and_non_objects() -> None:
    with pytest.raises(InvalidRequest, match="Missing required parameter: 'query'"):
        parse_body({"model": "m", "documents": ["a"]})
    with pytest.raises(InvalidRequest, match="must be a JSON object"):
        parse_body(["a"])


def test_response_sorted_best_first_cut_to_top_n() -> None:
    request = parse_body(body(top_n=2))
    out = rerank_body("rerank-1", "m", request, ["a", "b", "c"], [0.1, 0.9, 0.5], 12)
    assert out == {
        "id": "rerank-1",
        "model": "m",
        "results": [
            {"index": 1, "relevance_score": 0.9, "document": {"text": "b"}},
            {"index": 2, "relevance_score": 0.5, "document": {"text": "c"}},
        ],
        "usage": {"prompt_tokens": 12, "total_tokens": 12},
    }
    request = parse_body(body(return_documents=False))
    out = rerank_body("r", "m", request, ["a", "b", "c"], [0.5, 0.5, 0.7], 3)
    # every document without top_n; equal scores keep the input order
    assert out["results"] == [
        {"index": 2, "relevance_score": 0.7},
        {"index": 0, "relevance_score": 0.5},
        {"index": 1, "relevance_score": 0.5},
    ]


def test_estimate_counts_the_query_once_per_document() -> None:
    assert estimate_tokens({"query": "abcd", "documents": ["abcd", "abcdabcd"]}) == 5
    assert estimate_tokens({"query": None, "documents": None}) == 0


def test_options_are_checked_when_the_catalog_loads() -> None:
    assert RerankOptions.of(entry()) == RerankOptions(max_documents=1000, truncate=False)
    with pytest.raises(CatalogError, match=r"model 'test/ce': defaults.max_documents"):
        validate_options("test/ce", "rerank", {"max_documents": 0})
    with pytest.raises(CatalogError, match=r"defaults.truncation is not a known option"):
        validate_options("test/ce", "rerank", {"max_input_tokens": 8, "truncation": True})


# -- the backend against CrossEncoder.predict ----------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rerank-models")
    build_cross_encoder(root)
    build_cross_encoder(root, name="identity", activation="torch.nn.modules.linear.Identity")
    return root


def backend(path: Path, **defaults: Any) -> CrossEncoderBackend:
    return loaded(CrossEncoderBackend, "rerank", path, **defaults)  # type: ignore[no-any-return]


def predict(path: Path, pairs: list[tuple[str, str]], **kw: Any) -> np.ndarray:
    from sentence_transformers import CrossEncoder

    return np.asarray(CrossEncoder(str(path), device="cpu", **kw).predict(pairs))


@pytest.mark.parametrize("name", ["tiny-cross-encoder", "identity"])
def test_scores_equal_cross_encoder_predict(models: Path, name: str) -> None:
    b = backend(models / name)
    ours = b.forward(b.pairs(QUERY, DOCS))
    ref = predict(models / name, [(QUERY, d) for d in DOCS])
    assert np.abs(ours - ref).max() < 1e-5, (ours, ref)
    if name == "identity":  # logits, not probabilities
        assert (ours < 0).any() or (ours > 1).any()
    # one batch of different lengths (padded) gives what each pair gives alone
    alone = np.concatenate([b.forward([seq]) for seq in b.pairs(QUERY, DOCS)])
    assert np.abs(ours - alone).max() < 1e-5


def test_query_or_pair_over_the_context_is_a_400(models: Path) -> None:
    b = backend(models / "tiny-cross-encoder", max_input_tokens=16)
    with pytest.raises(ContextLengthExceeded) as info:
        b.pairs("word " * 14, ["a"])
    assert info.value.param == "query" and "16 tokens" in info.value.message
    assert "query alone has 17 tokens" in info.value.message
    with pytest.raises(ContextLengthExceeded) as info:
        b.pairs("short", ["fits", "word " * 13])
    assert info.value.param == "documents"
    assert "documents[1] has 17 tokens" in info.value.message


def test_truncate_cuts_as_cross_encoder_does(models: Path) -> None:
    path = models / "tiny-cross-encoder"
    b = backend(path, max_input_tokens=16, truncate=True)
    docs = ["word " * 40, "a short one", "many words " * 5]
    seqs = b.pairs("a long query " * 6, docs)
    assert max(len(s) for s in seqs) == 16
    ref = predict(path, [("a long query " * 6, d) for d in docs], max_length=16)
    assert np.abs(b.forward(seqs) - ref).max() < 1e-5


def test_a_model_with_several_labels_is_no_reranker(tmp_path: Path) -> None:
    from tests.sequence_models import build_classifier

    path = build_classifier(tmp_path)
    with pytest.raises(ValueError, match="has 3 labels; a reranker"):
        backend(path)


def test_live_requests_go_before_batch_work(models: Path) -> None:
    """The engine's batcher takes live work first: a live request sent after a large
    batch request finishes while most of the batch is still to compute."""
    from configs.settings import Settings
    from tasks.queue.names import BATCH, LIVE
    from workers.scoring import ScoringEngine

    b = backend(models / "tiny-cross-encoder")
    engine = ScoringEngine(b, Settings(max_batch_size=2))
    try:
        done: list[str] = []
        [batch] = engine.submit([b.pairs(QUERY, DOCS * 20)], lane=BATCH)
        [live] = engine.submit([b.pairs(QUERY, DOCS[:1])], lane=LIVE)
        batch.add_done_callback(lambda _: done.append("batch"))
        live.add_done_callback(lambda _: done.append("live"))
        assert live.result(timeout=30).prompt_tokens == len(b.pairs(QUERY, DOCS[:1])[0])
        assert len(batch.result(timeout=60).rows) == len(DOCS) * 20
        assert done == ["live", "batch"]
        assert engine.metrics()["forwards"] >= len(DOCS) * 10
    finally:
        engine.stop()


@pytest.mark.parametrize(
    "path", ["torch.load", "torch.nn.functional.relu", "torch.nn.NoSuchThing", "os.system"]
)
def test_a_config_names_only_an_activation_module(path: str) -> None:
    """The activation comes from the model's config: anything but a ``torch.nn`` module
    class (a function, a loader, another package) is not called; the sigmoid is used."""
    import torch

    config = SimpleNamespace(sentence_transformers={"activation_fn": path})
    assert activation_of(config) is torch.sigmoid
    tanh = activation_of(SimpleNamespace(sentence_transformers={"activation_fn": "torch.nn.Tanh"}))
    assert isinstance(tanh, torch.nn.Tanh)
