"""Classify against a real stack: Redis, a classify worker process, the database and the
API, serving tiny random-weight classifiers built here, called over HTTP with httpx (the
official ``openai`` client has no classify). Probabilities equal transformers'
``pipeline("text-classification", top_k=None)`` on the same weights, live and through the
Batch API; every bad input is an OpenAI-shaped 400 and the worker keeps serving."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.harness import Stack
from tests.integration.helpers import assert_openai_error
from tests.sequence_models import (
    LABELS,
    batch_against_live,
    build_classifier,
    entry,
    pipeline_probs,
    run_batch,
    serving,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CLS = "test/tiny-classifier"
MULTI = "test/tiny-multi-label"
BARE = "test/tiny-unlabeled"  # its config names no classes
RERANK = "test/some-reranker"  # served, without a worker: for the capability checks
EMBED = "laneway/fake-embeddings"
MAX_INPUTS = 4
CONTEXT = 32
TEXTS = ["i loved this film", "terrible, never again", "it was fine i guess"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    build_classifier(root)
    build_classifier(root, name="multi", problem_type="multi_label_classification", seed=1)
    build_classifier(root, name="bare", labels=None, num_labels=2)
    return root


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, models: Path) -> Iterator[Stack]:
    entries = [
        entry(
            CLS,
            "classify",
            models / "tiny-classifier",
            max_input_tokens=CONTEXT,
            max_inputs=MAX_INPUTS,
        ),
        entry(MULTI, "classify", models / "multi", max_input_tokens=CONTEXT),
        entry(BARE, "classify", models / "bare", max_input_tokens=CONTEXT),
        entry(RERANK, "rerank", models / "tiny-classifier"),  # no worker loads it
    ]
    root = tmp_path_factory.mktemp("classify-stack")
    with serving(root, "classify", entries, [CLS, MULTI, BARE, RERANK, EMBED]) as stack:
        yield stack


def classify(http: httpx.Client, model: str = CLS, **body: Any) -> httpx.Response:
    return http.post("/v1/classify", json={"model": model, "input": TEXTS, **body})


def assert_still_serving(http: httpx.Client) -> None:
    response = classify(http, input="still serving")
    assert response.status_code == 200, response.text
    assert response.json()["data"][0]["label"] in LABELS


def test_probs_equal_the_pipeline(http: httpx.Client, models: Path) -> None:
    from transformers import AutoTokenizer

    response = classify(http)
    assert response.status_code == 200, response.text
    out = response.json()
    assert set(out) == {"id", "object", "created", "model", "data", "usage"}
    assert out["id"].startswith("classify-") and out["object"] == "list"
    assert out["model"] == CLS and isinstance(out["created"], int)
    reference = pipeline_probs(models / "tiny-classifier", TEXTS)
    assert [d["index"] for d in out["data"]] == [0, 1, 2]
    for d, ref in zip(out["data"], reference, strict=True):
        assert d["num_classes"] == 3
        assert np.abs(np.asarray(d["probs"]) - ref).max() < 1e-5
        assert d["label"] == LABELS[int(np.argmax(ref))]
    tok = AutoTokenizer.from_pretrained(str(models / "tiny-classifier"))
    tokens = sum(len(ids) for ids in tok(TEXTS)["input_ids"])
    assert out["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_a_multi_label_model_and_a_single_string(http: httpx.Client, models: Path) -> None:
    out = classify(http, MULTI, input=TEXTS[0]).json()
    [d] = out["data"]
    reference = pipeline_probs(models / "multi", TEXTS[:1])[0]
    assert np.abs(np.asarray(d["probs"]) - reference).max() < 1e-5
    assert d["label"] == LABELS[int(np.argmax(reference))]


LONG = "word " * (CONTEXT + 5)


@pytest.mark.parametrize(
    ("body", "param", "contains"),
    [
        ({"input": []}, "input", "must not be empty"),
        ({"input": ""}, "input", "input[0] is empty"),
        ({"input": ["a"] * (MAX_INPUTS + 1)}, "input", f"at most {MAX_INPUTS}"),
        ({"input": ["fits", LONG]}, "input", f"maximum context length is {CONTEXT} tokens"),
        ({"input": None}, "input", "expected a string or a list of strings"),
        ({"input": [1, 2]}, "input", "expected a string or a list of strings"),
        ({"input": ["a", None]}, "input", None),
        ({"model": None}, "model", None),
        ({"model": BARE}, "model", "no class labels"),
    ],
)
def test_bad_inputs_are_openai_400s(
    http: httpx.Client, body: dict[str, Any], param: str, contains: str | None
) -> None:
    response = http.post("/v1/classify", json={"model": CLS, "input": TEXTS, **body})
    error = assert_openai_error(response, 400, param=param, contains=contains)
    if contains and "context length" in contains:
        assert error["code"] == "context_length_exceeded"
    assert_still_serving(http)


def test_models_of_other_capabilities(http: httpx.Client) -> None:
    response = classify(http, RERANK)
    assert_openai_error(response, 400, param="model", contains="is a rerank model")
    response = classify(http, EMBED)
    assert_openai_error(response, 400, param="model", contains="not a classify model")
    response = http.post("/v1/embeddings", json={"model": CLS, "input": "hello"})
    assert_openai_error(response, 400, param="model", contains="is a classify model")
    response = http.post("/v1/rerank", json={"model": CLS, "query": "q", "documents": ["d"]})
    assert_openai_error(response, 400, param="model", contains="not a rerank model")
    assert_still_serving(http)


def test_batch_lines_equal_live_answers(stack: Stack) -> None:
    good: list[dict[str, Any]] = [{"model": CLS, "input": TEXTS}, {"model": CLS, "input": "one"}]
    bad: list[tuple[dict[str, Any], str]] = [
        ({"model": CLS, "input": ["fits", LONG]}, "input"),
        ({"model": CLS, "input": []}, "input"),
        ({"model": CLS, "input": 5}, "input"),
    ]
    for line, live in batch_against_live(stack, "/v1/classify", good, bad):
        assert line["id"].startswith("classify-") and line["model"] == CLS
        for a, b in zip(line["data"], live["data"], strict=True):
            assert {**a, "probs": None} == {**b, "probs": None}
            assert np.abs(np.asarray(a["probs"]) - np.asarray(b["probs"])).max() < 1e-5
        assert line["usage"] == live["usage"]


def test_a_batch_for_a_model_without_labels(stack: Stack) -> None:
    done, [response] = run_batch(stack, "/v1/classify", [{"model": BARE, "input": "hello"}])
    assert done.status == "completed", done
    assert response["status_code"] == 400
    assert "no class labels" in response["body"]["error"]["message"]
