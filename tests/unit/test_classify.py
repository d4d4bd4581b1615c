"""Classify: the contract's rules (shared by the live route and Batch API lines), the
response shape, and the classifier backend's probabilities against transformers'
``pipeline("text-classification", top_k=None)`` on tiny models built here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from configs.catalog import CatalogEntry, CatalogError, validate_options
from tasks.contracts.classify import (
    ClassifyOptions,
    classification_body,
    classification_data,
    estimate_tokens,
    input_texts,
    parse_body,
)
from tasks.errors import ContextLengthExceeded, InvalidRequest
from tests.sequence_models import LABELS, build_classifier, catalog_entry, loaded, pipeline_probs
from workers.backends.classify import ClassifierBackend

TEXTS = ["i loved this film", "terrible, never again", "it was fine [SEP] i guess", "ok"]


def entry(**defaults: Any) -> CatalogEntry:
    return catalog_entry("classify", Path("/cls"), **defaults)  # type: ignore[no-any-return]


# -- the contract ------------------------------------------------------------------------


def test_a_string_or_a_list_of_strings() -> None:
    assert input_texts(parse_body({"model": "m", "input": "one"}), entry()) == ["one"]
    assert input_texts(parse_body({"model": "m", "input": ["a", "b"]}), entry()) == ["a", "b"]


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ([], "'input' must not be empty"),
        ("", "input[0] is empty"),
        (["a", ""], "input[1] is empty"),
        (["a", "b", "c"], "at most 2"),
        (["\ud800"], "input[0] is not valid Unicode"),
    ],
)
def test_rules_before_tokenizing(value: Any, needle: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        input_texts(parse_body({"model": "m", "input": value}), entry(max_inputs=2))
    assert info.value.param == "input" and needle in info.value.message


@pytest.mark.parametrize("value", [None, 3, [1, 2], ["a", None], [["a"]], {"text": "a"}])
def test_wrong_types_and_nulls_are_400s(value: Any) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_body({"model": "m", "input": value})
    assert info.value.param == "input"
    assert (
        info.value.message == "Invalid value for 'input': expected a string or a list of strings."
    )


def test_missing_input_and_model() -> None:
    with pytest.raises(InvalidRequest, match="Missing required parameter: 'input'"):
        parse_body({"model": "m"})
    with pytest.raises(InvalidRequest) as info:
        parse_body({"input": "a", "model": 5})
    assert info.value.param == "model"


def test_response_shape() -> None:
    data = classification_data(["neg", "pos"], [[0.25, 0.75], [0.5, 0.5]])
    assert data == [
        {"index": 0, "label": "pos", "probs": [0.25, 0.75], "num_classes": 2},
        {"index": 1, "label": "neg", "probs": [0.5, 0.5], "num_classes": 2},  # ties: first
    ]
    assert classification_body("classify-1", "m", 7, data, 9) == {
        "id": "classify-1",
        "object": "list",
        "created": 7,
        "model": "m",
        "data": data,
        "usage": {"prompt_tokens": 9, "total_tokens": 9},
    }


def test_estimate_and_options() -> None:
    assert estimate_tokens({"input": ["abcd", "abcde", 7]}) == 3
    assert ClassifyOptions.of(entry()).labels is None
    with pytest.raises(CatalogError, match=r"defaults.max_inputs"):
        validate_options("test/cls", "classify", {"max_inputs": 0})
    with pytest.raises(CatalogError, match=r"defaults.labels"):
        validate_options("test/cls", "classify", {"labels": "neg,pos"})


# -- the backend against the text-classification pipeline ---------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("classify-models")
    build_classifier(root)
    build_classifier(root, name="multi", problem_type="multi_label_classification", seed=1)
    build_classifier(root, name="regression", labels=["score"], problem_type="regression")
    build_classifier(root, name="unlabeled", labels=None, num_labels=3)
    return root


def backend(path: Path, **defaults: Any) -> ClassifierBackend:
    return loaded(ClassifierBackend, "classify", path, **defaults)  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", ["tiny-classifier", "multi", "regression"])
def test_probs_equal_the_pipeline(models: Path, name: str) -> None:
    b = backend(models / name)
    ours = b.forward(b.texts(TEXTS))
    ref = pipeline_probs(models / name, TEXTS)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 1e-5, (ours, ref)
    assert b.labels == (("score",) if name == "regression" else LABELS)
    if name == "tiny-classifier":
        assert np.allclose(ours.sum(axis=1), 1.0, atol=1e-5)  # a softmax
    if name == "multi":
        assert not np.allclose(ours.sum(axis=1), 1.0, atol=1e-3)  # a sigmoid per class


def test_a_model_without_labels_is_refused_per_request(models: Path) -> None:
    b = backend(models / "unlabeled")  # it loads (and warns)
    with pytest.raises(InvalidRequest) as info:
        b.texts(["hello"])
    assert info.value.param == "model" and "no class labels" in info.value.message
    named = backend(models / "unlabeled", labels=("a", "b", "c"))
    assert named.labels == ("a", "b", "c") and len(named.texts(["hello"])) == 1
    with pytest.raises(ValueError, match="3 classes, its catalog entry names 2 labels"):
        backend(models / "unlabeled", labels=("a", "b"))


def test_a_text_over_the_context(models: Path) -> None:
    path = models / "tiny-classifier"
    with pytest.raises(ContextLengthExceeded) as info:
        backend(path, max_input_tokens=16).texts(["fine", "word " * 15])
    assert info.value.param == "input" and "input[1] has 17 tokens" in info.value.message
    cut = backend(path, max_input_tokens=16, truncate=True)
    seqs = cut.texts(["word " * 15, "short"])
    assert [len(s) for s in seqs] == [16, 3]
    ref = pipeline_probs(path, ["word " * 15, "short"], truncation=True, max_length=16)
    assert np.abs(cut.forward(seqs) - ref).max() < 1e-5
