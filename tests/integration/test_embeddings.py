"""Live embeddings through the whole path: official openai client -> API -> Redis ->
Celery worker process -> MiniLM, compared with sentence-transformers' own computation."""

from __future__ import annotations

import base64
import time
from typing import Any

import httpx
import numpy as np
import pytest

from tests.harness import Stack
from tests.integration.helpers import (
    MATRYOSHKA,
    MINILM,
    assert_openai_error,
    assert_still_serving,
    cosine,
    metrics,
    sample,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "laneway serves models behind an OpenAI-compatible API",
    "short",
    "Embeddings map text to vectors; similar meanings land close together, "
    "which makes them useful for search, clustering and deduplication.",
    "Ünïcödé and emoji 🚀 survive the trip",
]


@pytest.fixture(scope="module")
def stack(minilm_stack: Stack) -> Stack:
    return minilm_stack


@pytest.fixture(scope="module")
def client(stack: Stack) -> Any:
    return stack.openai_client()


@pytest.fixture(scope="module")
def reference(reference_model: Any) -> Any:
    def encode(texts: list[str]) -> np.ndarray:
        return np.asarray(reference_model.encode(texts, normalize_embeddings=False))

    return encode


def token_ids(reference_model: Any, text: str, *, special: bool) -> list[int]:
    return list(reference_model.tokenizer(text, add_special_tokens=special)["input_ids"])


# -- correctness -----------------------------------------------------------------------------


def as_vector(embedding: Any) -> np.ndarray:
    """The official client hands back floats, or the base64 string when base64 was asked
    for explicitly (it decodes only what it asked for itself)."""
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding), dtype="<f4")
    return np.asarray(embedding, dtype=np.float32)


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_single_string_matches_reference(client: Any, reference: Any, encoding_format: str) -> None:
    response = client.embeddings.create(
        model=MINILM, input=TEXTS[0], encoding_format=encoding_format
    )
    assert response.model == MINILM
    assert len(response.data) == 1
    got = as_vector(response.data[0].embedding)
    assert len(got) == 384
    assert cosine(got, reference([TEXTS[0]])[0]) > 0.999
    assert abs(np.linalg.norm(got) - 1.0) < 1e-4


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_batch_matches_reference_in_order(
    client: Any, reference: Any, encoding_format: str
) -> None:
    response = client.embeddings.create(model=MINILM, input=TEXTS, encoding_format=encoding_format)
    assert [d.index for d in response.data] == list(range(len(TEXTS)))
    expected = reference(TEXTS)
    for item, ref in zip(response.data, expected, strict=True):
        assert cosine(as_vector(item.embedding), ref) > 0.999


def test_default_encoding_is_base64_and_decodes(client: Any, reference: Any) -> None:
    # no encoding_format: the official client asks for base64 and decodes it into floats
    response = client.embeddings.create(model=MINILM, input=TEXTS[1])
    assert isinstance(response.data[0].embedding, list)
    assert len(response.data[0].embedding) == 384
    assert cosine(response.data[0].embedding, reference([TEXTS[1]])[0]) > 0.999


def test_raw_base64_is_little_endian_float32(stack: Stack, reference: Any) -> None:
    response = httpx.post(
        f"{stack.base_url}/v1/embeddings",
        json={"model": MINILM, "input": TEXTS[:2], "encoding_format": "base64"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list"
    expected = reference(TEXTS[:2])
    for item, ref in zip(body["data"], expected, strict=True):
        assert item["object"] == "embedding"
        assert isinstance(item["embedding"], str)
        raw = base64.b64decode(item["embedding"])
        assert len(raw) == 384 * 4
        vec = np.frombuffer(raw, dtype="<f4")
        assert cosine(vec, ref) > 0.999


def test_raw_float_response_shape(stack: Stack) -> None:
    response = httpx.post(
        f"{stack.base_url}/v1/embeddings",
        json={"model": MINILM, "input": "shape check"},
        timeout=60,
    )
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"object", "data", "model", "usage"}
    assert body["model"] == MINILM
    item = body["data"][0]
    assert set(item) == {"object", "index", "embedding"}
    assert all(isinstance(x, float) for x in item["embedding"])
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"]


def test_token_ids_equal_text(client: Any, reference_model: Any) -> None:
    text = TEXTS[3]
    ids = token_ids(reference_model, text, special=False)
    by_text = client.embeddings.create(model=MINILM, input=text, encoding_format="float")
    by_ids = client.embeddings.create(model=MINILM, input=ids, encoding_format="float")
    assert cosine(by_text.data[0].embedding, by_ids.data[0].embedding) > 0.9999
    # same tokens processed, same count reported
    assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens


def test_list_of_token_lists(client: Any, reference_model: Any, reference: Any) -> None:
    ids = [token_ids(reference_model, t, special=False) for t in TEXTS[:3]]
    response = client.embeddings.create(model=MINILM, input=ids, encoding_format="float")
    for item, ref in zip(response.data, reference(TEXTS[:3]), strict=True):
        assert cosine(item.embedding, ref) > 0.999


def test_usage_counts_real_tokens(client: Any, reference_model: Any) -> None:
    expected = sum(len(token_ids(reference_model, t, special=True)) for t in TEXTS)
    response = client.embeddings.create(model=MINILM, input=TEXTS)
    assert response.usage.prompt_tokens == expected
    assert response.usage.total_tokens == expected


def test_input_at_the_token_limit_is_accepted(client: Any, reference_model: Any) -> None:
    ids = token_ids(reference_model, "word " * 400, special=False)[:254]  # + [CLS] [SEP] = 256
    response = client.embeddings.create(model=MINILM, input=ids)
    assert response.usage.prompt_tokens == 256
    assert len(response.data[0].embedding) == 384


def test_many_inputs_in_one_request(client: Any, reference: Any) -> None:
    texts = [f"sentence number {i} about topic {i % 7}" for i in range(300)]
    response = client.embeddings.create(model=MINILM, input=texts)
    assert len(response.data) == 300
    expected = reference(texts[::50])
    for got, ref in zip(response.data[::50], expected, strict=True):
        assert cosine(got.embedding, ref) > 0.999


# -- dimensions ----------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [128, 256, 384])
def test_dimensions_on_matryoshka_entry(client: Any, reference: Any, dims: int) -> None:
    response = client.embeddings.create(
        model=MATRYOSHKA, input=TEXTS[0], dimensions=dims, encoding_format="float"
    )
    vec = np.asarray(response.data[0].embedding)
    assert vec.shape == (dims,)
    assert abs(np.linalg.norm(vec) - 1.0) < 1e-4
    ref = reference([TEXTS[0]])[0][:dims]
    assert cosine(vec, ref) > 0.999
    assert response.model == MATRYOSHKA


def test_dimensions_base64_length(stack: Stack) -> None:
    response = httpx.post(
        f"{stack.base_url}/v1/embeddings",
        json={"model": MATRYOSHKA, "input": "x", "dimensions": 128, "encoding_format": "base64"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert len(base64.b64decode(response.json()["data"][0]["embedding"])) == 128 * 4


def test_dimensions_not_in_the_trained_sizes(stack: Stack) -> None:
    response = httpx.post(
        f"{stack.base_url}/v1/embeddings",
        json={"model": MATRYOSHKA, "input": "x", "dimensions": 200},
        timeout=60,
    )
    assert_openai_error(response, 400, param="dimensions", contains="384, 256, 128")
    assert_still_serving(stack)


def test_dimensions_on_minilm_is_refused(stack: Stack, client: Any) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=MINILM, input="x", dimensions=128)
    assert info.value.status_code == 400
    response = httpx.post(
        f"{stack.base_url}/v1/embeddings",
        json={"model": MINILM, "input": "x", "dimensions": 128},
        timeout=60,
    )
    assert_openai_error(response, 400, param="dimensions", contains="dimensions")
    assert_still_serving(stack)


# -- models, health, metrics -------------------------------------------------------------------


def test_list_models(client: Any, stack: Stack) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == [MINILM, MATRYOSHKA]
    body = httpx.get(f"{stack.base_url}/v1/models", timeout=10).json()
    assert body["object"] == "list"
    card = body["data"][0]
    assert card["object"] == "model"
    assert card["id"] == MINILM
    assert isinstance(card["created"], int)
    assert card["owned_by"]


def test_retrieve_model_with_slash(client: Any, stack: Stack) -> None:
    response = httpx.get(f"{stack.base_url}/v1/models/{MINILM}", timeout=10)
    assert response.status_code == 200, response.text
    assert response.json()["id"] == MINILM
    assert client.models.retrieve(MINILM).id == MINILM  # the client escapes the slash
    assert client.models.retrieve(MATRYOSHKA).id == MATRYOSHKA


def test_retrieve_unknown_model(stack: Stack) -> None:
    response = httpx.get(f"{stack.base_url}/v1/models/nobody/nothing", timeout=10)
    assert_openai_error(response, 404, code="model_not_found")
    # in the catalog but not served here
    response = httpx.get(f"{stack.base_url}/v1/models/BAAI/bge-m3", timeout=10)
    assert_openai_error(response, 404)


def test_health_lists_the_warm_worker(stack: Stack) -> None:
    response = httpx.get(f"{stack.base_url}/health", timeout=10)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["broker"] == "ok"
    info = stack.worker_info(stack.workers[0])
    assert info is not None
    for model in (MINILM, MATRYOSHKA):
        assert body["models"][model]["warm"] is True
        assert info["id"] in body["models"][model]["workers"]
        assert info["id"] in body["models"][model]["warm_workers"]


def test_metrics(stack: Stack, client: Any) -> None:
    client.embeddings.create(model=MINILM, input="metrics please")
    httpx.post(
        f"{stack.base_url}/v1/embeddings", json={"model": "no/such", "input": "x"}, timeout=10
    )
    # batch sizes come from the worker's heartbeat (every LANEWAY_HEARTBEAT_S)
    deadline = time.monotonic() + 15
    while True:
        samples = metrics(stack)
        forwards = sample(samples, "laneway_forward_batch_size_count", model=MINILM)
        if forwards > 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert forwards > 0
    assert sample(samples, "laneway_forward_batch_size_sum", model=MINILM) >= forwards
    # the worker's forward seconds and live queue wait, one observation per forward/request
    assert sample(samples, "laneway_forward_seconds_count", model=MINILM) == forwards
    assert sample(samples, "laneway_forward_seconds_sum", model=MINILM) > 0
    assert sample(samples, "laneway_queue_wait_seconds_count", model=MINILM, lane="live") >= 1
    text = httpx.get(f"{stack.base_url}/metrics", timeout=10).text
    assert "# TYPE laneway_batches gauge" in text  # batches by status, from the database
    assert (
        sample(
            samples,
            "laneway_request_duration_seconds_count",
            route="/v1/embeddings",
            model=MINILM,
            status="200",
        )
        >= 1
    )
    assert "laneway_queue_depth" in samples
    assert {labels["queue"] for labels, _ in samples["laneway_queue_depth"]} >= {
        "embeddings.live",
        "embeddings.batch",
    }
    assert sample(samples, "laneway_errors_total", route="/v1/embeddings", code="404") >= 1
