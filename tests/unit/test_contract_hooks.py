"""The hooks a capability's contract module declares and the generic code reads through the
registry: ``ENGINE_COUNTERS`` (api/metrics.py), ``OPTIONS`` (configs/catalog.py, and the
fields /v1/models shows), ``ROLLING`` (workers/rolling.py), ``bench_request`` (`laneway
benchmark`; the bodies it makes are checked against each capability's schema in
test_benchmark_cli.py). ``estimate_tokens`` is in test_token_estimate.py."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest

from api.metrics import WorkerStatsCollector, engine_counters
from api.routes.models import router as models_router
from configs.capabilities import REGISTRY
from configs.catalog import CatalogEntry, CatalogError, CatalogOptions, load_catalog
from tasks.contracts.audio import AudioOptions
from tasks.contracts.base import BenchRequest, Rolling
from tasks.contracts.chat import ChatOptions
from tasks.contracts.embeddings import EmbeddingsOptions

EMBED = "laneway/fake-embeddings"
CHAT = "Qwen/Qwen3-VL-2B-Instruct"
AUDIO = "Systran/faster-whisper-tiny.en"

# -- engine counters ---------------------------------------------------------------------------


def test_metrics_take_the_counters_from_the_contracts_under_their_old_names() -> None:
    assert {(c.key, c.name) for c in engine_counters()} >= {
        ("cache_hits", "laneway_embedding_cache_hits"),
        ("cache_misses", "laneway_embedding_cache_misses"),
        ("completion_tokens", "laneway_completion_tokens"),
        ("preempted", "laneway_chat_preempted"),
        ("audio_seconds", "laneway_audio_seconds"),
    }
    declared = [c for cap in REGISTRY.values() for c in cap.contract_module().ENGINE_COUNTERS]
    assert {c.key for c in engine_counters()} == {c.key for c in declared}
    keys = [c.key for c in engine_counters()]
    assert len(keys) == len(set(keys))  # a key two contracts declare is one family
    names = [c.name for c in engine_counters()]
    assert len(names) == len(set(names))


def test_every_declared_counter_reaches_the_exposition() -> None:
    counters = engine_counters()
    model = {"forwards": 1, "items": 1, "batch_size_buckets": {"1": 1}}
    model |= {c.key: 2.5 for c in counters}
    collector = WorkerStatsCollector()
    collector.update([json.dumps({"worker": "w1", "models": {"m": model}})])
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    for counter in counters:
        assert f'{counter.name}_total{{model="m",worker="w1"}} 2.5' in text
        assert f"# HELP {counter.name}_total {counter.help}" in text


# -- catalog options ---------------------------------------------------------------------------


def test_the_packaged_catalog_validates_into_each_capabilitys_options() -> None:
    catalog = load_catalog()
    for entry in catalog.entries.values():
        assert type(entry.options) is REGISTRY[entry.capability].contract_module().OPTIONS
    assert EmbeddingsOptions.of(catalog.get(EMBED)).matryoshka_dims == (32, 16, 8)
    assert ChatOptions.of(catalog.get(CHAT)).supports_images
    assert AudioOptions.of(catalog.get(AUDIO)) == AudioOptions(
        english_only=True, beam_size=5, batch_size=8
    )


def write(tmp_path: Path, capability: str, defaults: dict[str, Any]) -> Path:
    path = tmp_path / "models.yaml"
    entry = {"id": "me/m", "capability": capability, "source": {"path": "/"}}
    path.write_text(yaml.safe_dump({"models": [{**entry, "defaults": defaults}]}))
    return path


@pytest.mark.parametrize(
    ("capability", "defaults", "message"),
    [
        ("embeddings", {"dimension": 8}, "defaults.dimension is not a known option"),
        ("embeddings", {"dimensions": "8"}, "defaults.dimensions: Input should be a valid integer"),
        ("embeddings", {"matryoshka_dims": [8, 0]}, "defaults.matryoshka_dims.1: Input should"),
        ("embeddings", {"quantize": "int4"}, "defaults.quantize: Input should be 'int8'"),
        ("embeddings", {"dimensions": 5, "matryoshka_dims": [8, 4]}, "must be one of"),
        ("chat", {"max_running": 0}, "defaults.max_running: Input should be greater than"),
        ("chat", {"supports_images": "yes"}, "defaults.supports_images: Input should be a"),
        ("chat", {"dimensions": 8}, "defaults.dimensions is not a known option"),
        ("audio", {"beam_size": 0}, "defaults.beam_size: Input should be greater than"),
        ("audio", {"english_only": "no"}, "defaults.english_only: Input should be a valid"),
        ("audio", {"compute_type": 8}, "defaults.compute_type: Input should be a valid string"),
        ("audio", {"max_tokens": 8}, "defaults.max_tokens is not a known option"),
        ("audio", {"max_tokens": None}, "defaults.max_tokens is not a known option"),
    ],
)
def test_a_wrong_option_names_the_entry_and_the_key_when_the_catalog_loads(
    tmp_path: Path, capability: str, defaults: dict[str, Any], message: str
) -> None:
    path = write(tmp_path, capability, {"max_input_tokens": 64, **defaults})
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    assert message in str(info.value)
    assert "model 'me/m'" in str(info.value) and str(path) in str(info.value)


def test_an_unknown_key_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match=r"known: max_input_tokens, .*, english_only"):
        load_catalog(write(tmp_path, "audio", {"beams": 2}))


def test_null_takes_the_default_and_the_common_keys_stay_on_the_entry(tmp_path: Path) -> None:
    defaults = {"max_input_tokens": 64, "batch_token_budget": 8, "dtype": "float16"}
    entry = load_catalog(write(tmp_path, "chat", {**defaults, "max_tokens": None})).get("me/m")
    assert ChatOptions.of(entry) == ChatOptions()
    assert (entry.max_input_tokens, entry.batch_token_budget, entry.dtype) == (64, 8, "float16")


def make(capability: str, options: Any = None) -> CatalogEntry:
    extra = {} if options is None else {"options": options}
    return CatalogEntry(
        id="me/x",
        capability=capability,
        backend="workers.backends.fake:Fake",
        source={"path": "/"},
        max_input_tokens=64,
        batch_token_budget=8,
        **extra,
    )


def test_entries_made_in_code_are_validated_and_typed_too() -> None:
    assert EmbeddingsOptions.of(make("embeddings")) == EmbeddingsOptions()
    assert AudioOptions.of(make("audio", {"batch_size": 2})).batch_size == 2
    with pytest.raises(CatalogError, match=r"'me/x': defaults\.batch_size"):
        make("audio", {"batch_size": "2"})
    with pytest.raises(CatalogError, match="ChatOptions, not AudioOptions"):
        make("audio", ChatOptions())
    with pytest.raises(TypeError, match="not ChatOptions"):
        ChatOptions.of(make("audio"))
    with pytest.raises(CatalogError, match="telepathy"):
        make("telepathy")


def test_options_are_frozen() -> None:
    options = EmbeddingsOptions(dimensions=8)
    with pytest.raises(ValueError, match="frozen"):
        options.dimensions = 9  # type: ignore[misc]


def test_public_fields() -> None:
    assert CatalogOptions().public() == {}
    assert EmbeddingsOptions(dimensions=8).public() == {"dimensions": 8}
    assert EmbeddingsOptions().public() == {}
    assert ChatOptions(max_tokens=8).public() == AudioOptions().public() == {}


# -- /v1/models --------------------------------------------------------------------------------


def test_models_show_dimensions_only_where_the_options_publish_them() -> None:
    app = FastAPI()
    app.include_router(models_router)
    served = [EMBED, CHAT, AUDIO]
    app.state.laneway = SimpleNamespace(
        catalog=load_catalog(), settings=SimpleNamespace(models=served), started_at=7
    )
    client = TestClient(app)
    body = client.get("/v1/models").json()
    cards = {card["id"]: card for card in body["data"]}
    assert list(cards) == [*served, "whisper-1"]
    assert cards[EMBED] == {
        "id": EMBED,
        "object": "model",
        "created": 7,
        "owned_by": "laneway",
        "capability": "embeddings",
        "max_input_tokens": 128,
        "dimensions": 32,
    }
    for name in (CHAT, AUDIO, "whisper-1"):
        assert "dimensions" not in cards[name]
        assert {"id", "object", "created", "owned_by"} <= set(cards[name])
    assert client.get(f"/v1/models/{EMBED}").json()["dimensions"] == 32
    assert "dimensions" not in client.get("/v1/models/whisper-1").json()


# -- benchmark requests ------------------------------------------------------------------------


def test_every_contract_makes_benchmark_requests_with_one_signature() -> None:
    for name, capability in REGISTRY.items():
        hook = capability.contract_module().bench_request
        params = inspect.signature(hook).parameters
        assert list(params) == ["model", "input_tokens", "output_tokens", "clip", "seq"], name
        assert all(p.kind is p.KEYWORD_ONLY for p in list(params.values())[1:]), name
        request = hook("me/x", input_tokens=16, output_tokens=4, clip=b"RIFF....", seq=3)
        assert isinstance(request, BenchRequest), name
        assert request.path.startswith("/v1/") and request.unit, name
        assert (request.json is None) != (request.form is None), name  # exactly one body
        body = request.json if request.json is not None else request.form
        assert body is not None and body["model"] == "me/x", name
        assert request.units({}) is None, name  # an answer without the count: unknown


def test_every_contract_says_what_its_engine_gives_rolling_records() -> None:
    """``ROLLING``: a unit counter the engine really reports (one of its contract's
    ``ENGINE_COUNTERS``), and a rate of requests or of units at least."""
    for name, capability in REGISTRY.items():
        contract = capability.contract_module()
        rolling = contract.ROLLING
        assert isinstance(rolling, Rolling), name
        assert rolling.requests or rolling.unit, name
        assert (rolling.unit_key is None) == (rolling.unit is None), name
        if rolling.unit_key is not None:
            assert rolling.unit_key in {c.key for c in contract.ENGINE_COUNTERS}, name
