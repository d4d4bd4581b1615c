"""The embeddings request rules shared by the API and the workers."""

from __future__ import annotations

import base64
import json
import struct
from array import array
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from api.protocol.embeddings import EmbeddingRequest
from api.serving.embeddings import normalise_input
from configs.catalog import load_catalog
from tasks.contracts.embeddings import check_dimensions
from tasks.errors import InvalidRequest
from workers.embeddings import data_fragment, encode_vector


def req(input: Any, **kw: Any) -> EmbeddingRequest:
    return EmbeddingRequest.model_validate({"model": "m", "input": input, **kw})


# -- normalise_input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("hello", ["hello"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),  # one token list
        ([[1, 2], [3]], [[1, 2], [3]]),  # several token lists
        ([0], [[0]]),
    ],
)
def test_normalise_shapes(raw: Any, expected: Any) -> None:
    assert normalise_input(req(raw), 2048) == expected


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ("", "input[0] is empty"),
        ([], "must not be empty"),
        (["a", ""], "input[1] is empty"),
        ([[1], []], "input[1] is empty"),
    ],
)
def test_empty_inputs_are_refused(raw: Any, needle: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        normalise_input(req(raw), 2048)
    assert needle in info.value.message
    assert info.value.param == "input"
    assert info.value.status_code == 400


@pytest.mark.parametrize("raw", ["a\ud800b", ["ok", "\udfff"]])
def test_lone_surrogates_are_refused(raw: Any) -> None:
    with pytest.raises(InvalidRequest, match="surrogate") as info:
        normalise_input(req(raw), 2048)
    assert info.value.param == "input"


def test_item_limit() -> None:
    assert len(normalise_input(req(["x"] * 2048), 2048)) == 2048
    with pytest.raises(InvalidRequest, match="2049 items; at most 2048"):
        normalise_input(req(["x"] * 2049), 2048)
    # token lists count as items too
    with pytest.raises(InvalidRequest, match="at most 3"):
        normalise_input(req([[1]] * 4), 3)


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "input": 123},
        {"model": "m", "input": {"a": 1}},
        {"model": "m", "input": [1, "a"]},
        {"model": "m", "input": [True]},
        {"model": "m", "input": 1.5},
        {"model": 5, "input": "x"},
        {"input": "x"},
        {"model": "m"},
        {"model": "m", "input": "x", "encoding_format": "hex"},
        {"model": "m", "input": "x", "dimensions": 0},
        {"model": "m", "input": "x", "dimensions": "64"},
    ],
)
def test_request_schema_refuses_wrong_types(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        EmbeddingRequest.model_validate(body)


def test_request_defaults_and_extras() -> None:
    r = EmbeddingRequest.model_validate({"model": "m", "input": "x", "unknown_field": 1})
    assert r.encoding_format == "float"
    assert r.dimensions is None


# -- check_dimensions --------------------------------------------------------------------------


def test_dimensions_rules() -> None:
    catalog = load_catalog()
    minilm = catalog.get("sentence-transformers/all-MiniLM-L6-v2")
    fake = catalog.get("laneway/fake-embeddings")  # matryoshka 32, 16, 8
    check_dimensions(minilm, None)
    check_dimensions(minilm, 384)  # the native size is always fine
    with pytest.raises(InvalidRequest, match="does not support the 'dimensions'") as info:
        check_dimensions(minilm, 128)
    assert info.value.param == "dimensions"
    check_dimensions(fake, 16)
    check_dimensions(fake, 8)
    with pytest.raises(InvalidRequest, match="supports dimensions 32, 16, 8; got 12"):
        check_dimensions(fake, 12)


# -- the base64 wire format --------------------------------------------------------------------


def decode_vector(b64: str) -> list[float]:
    """What a client does with a base64 embedding: little-endian float32 to floats."""
    return array("f", base64.b64decode(b64)).tolist()


def test_encode_decode_round_trip() -> None:
    vec = np.random.default_rng(0).standard_normal(384).astype(np.float32)
    assert decode_vector(encode_vector(vec)) == vec.tolist()


def test_encoding_is_little_endian_float32() -> None:
    b64 = encode_vector(np.array([1.0, -2.5], dtype=">f4"))  # big-endian input
    assert base64.b64decode(b64) == struct.pack("<2f", 1.0, -2.5)
    assert decode_vector(base64.b64encode(struct.pack("<3f", 0.5, 2.0, -1.0)).decode()) == [
        0.5,
        2.0,
        -1.0,
    ]


def test_float64_input_is_narrowed() -> None:
    b64 = encode_vector(np.array([0.1, 0.2], dtype=np.float64))
    assert len(base64.b64decode(b64)) == 8
    assert decode_vector(b64) == pytest.approx([0.1, 0.2], rel=1e-6)


# -- the data array the worker sends and the API passes on -------------------------------------


def test_float_fragment_is_the_exact_float32_values() -> None:
    vecs = list(np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32))
    data = json.loads(data_fragment(vecs, "float"))
    assert [d["index"] for d in data] == [0, 1, 2]
    assert {d["object"] for d in data} == {"embedding"}
    for item, vec in zip(data, vecs, strict=True):
        assert np.array_equal(np.asarray(item["embedding"], dtype=np.float32), vec)


def test_base64_fragment_matches_encode_vector() -> None:
    vecs = list(np.random.default_rng(2).standard_normal((2, 8)).astype(np.float32))
    data = json.loads(data_fragment(vecs, "base64"))
    assert [d["embedding"] for d in data] == [encode_vector(v) for v in vecs]
    assert decode_vector(data[1]["embedding"]) == vecs[1].tolist()
