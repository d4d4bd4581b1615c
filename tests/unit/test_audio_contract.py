"""The audio contract (``tasks/contracts/audio.py``): form and batch-body parsing, the rules beyond
the schema, the work payload; and the catalog's model aliases (``whisper-1``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from configs.catalog import CatalogEntry, CatalogError, load_catalog
from tasks.contracts import audio
from tasks.contracts import base as contract
from tasks.errors import InvalidRequest, ModelNotFound

TINY_EN = "Systran/faster-whisper-tiny.en"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
AUDIO_KEY = {"key": "uploads/abc"}


def entry(model_id: str = "test/whisper", **options: Any) -> CatalogEntry:
    return CatalogEntry(
        id=model_id,
        capability="audio",
        backend="workers.backends.audio_faster_whisper:FasterWhisperBackend",
        source={"hub": model_id},
        max_input_tokens=448,
        batch_token_budget=0,
        options=options,
    )


def user_catalog(tmp_path: Path, models: list[dict[str, Any]]) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": models}, sort_keys=False))
    return path


def audio_model(model_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": model_id,
        "capability": "audio",
        "source": {"hub": model_id},
        "defaults": {"max_input_tokens": 448, "batch_token_budget": 0},
        **extra,
    }


def refused(fields: Any, *, parse: Any = audio.parse_form) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        parse(fields)
    assert info.value.status_code == 400
    return info.value


# -- parse_form ------------------------------------------------------------------------------


def test_form_values_are_parsed_laxly() -> None:
    request = audio.parse_form(
        {"model": "whisper-1", "temperature": "0.2", "stream": "true", "language": "de"}
    )
    assert request.model == "whisper-1"
    assert request.temperature == 0.2
    assert request.stream is True
    assert request.language == "de"


def test_form_defaults() -> None:
    request = audio.parse_form({"model": "whisper-1"})
    assert request.temperature == 0.0
    assert request.stream is False
    assert request.response_format == "json"
    assert request.timestamp_granularities == []
    assert request.language is None
    assert request.prompt is None


def test_granularity_given_once_or_repeated() -> None:
    once = audio.parse_form({"model": "m", "timestamp_granularities[]": "word"})
    assert once.timestamp_granularities == ["word"]
    repeated = audio.parse_form({"model": "m", "timestamp_granularities[]": ["word", "segment"]})
    assert repeated.timestamp_granularities == ["word", "segment"]
    plain = audio.parse_form({"model": "m", "timestamp_granularities": "segment"})
    assert plain.timestamp_granularities == ["segment"]


def test_empty_form_values_count_as_absent() -> None:
    request = audio.parse_form(
        {
            "model": "m",
            "language": "",
            "prompt": "",
            "temperature": "",
            "response_format": "",
            "stream": "",
            "timestamp_granularities[]": "",
        }
    )
    assert request.language is None
    assert request.prompt is None
    assert request.temperature == 0.0
    assert request.response_format == "json"
    assert request.stream is False
    assert request.timestamp_granularities == []


@pytest.mark.parametrize("fields", [{}, {"model": ""}, {"language": "en"}])
def test_form_without_model(fields: dict[str, str]) -> None:
    exc = refused(fields)
    assert exc.param == "model"
    assert "model" in exc.message


@pytest.mark.parametrize("value", ["5", 5, "hot", "-0.1"])
def test_form_bad_temperature(value: Any) -> None:
    assert refused({"model": "m", "temperature": value}).param == "temperature"


def test_form_unknown_response_format() -> None:
    assert refused({"model": "m", "response_format": "xml"}).param == "response_format"


def test_form_unknown_granularity() -> None:
    exc = refused({"model": "m", "timestamp_granularities[]": ["word", "sentence"]})
    assert exc.param == "timestamp_granularities"


# -- check and to_work -----------------------------------------------------------------------


def work(fields: dict[str, Any], model: CatalogEntry | None = None) -> dict[str, Any]:
    request = audio.parse_form({"model": "m", **fields})
    return audio.to_work(request, model or entry(), "transcribe", AUDIO_KEY)


def check_refused(fields: dict[str, Any], model: CatalogEntry | None = None) -> InvalidRequest:
    request = audio.parse_form({"model": "m", **fields})
    with pytest.raises(InvalidRequest) as info:
        audio.check(request, model or entry(), "transcribe")
    # to_work applies the same rules
    with pytest.raises(InvalidRequest):
        audio.to_work(request, model or entry(), "transcribe", AUDIO_KEY)
    return info.value


@pytest.mark.parametrize("fmt", ["json", "text", "srt", "vtt"])
def test_word_granularity_needs_verbose_json(fmt: str) -> None:
    fields = {"timestamp_granularities[]": "word", "response_format": fmt}
    assert check_refused(fields).param == "timestamp_granularities"


def test_word_granularity_with_verbose_json() -> None:
    payload = work({"timestamp_granularities[]": "word", "response_format": "verbose_json"})
    assert payload["words"] is True
    assert payload["segments"] is False


@pytest.mark.parametrize("fmt", ["srt", "vtt", "verbose_json"])
def test_stream_refused_with_timed_formats(fmt: str) -> None:
    assert check_refused({"stream": "true", "response_format": fmt}).param == "stream"


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_stream_with_json_or_text(fmt: str) -> None:
    payload = work({"stream": "true", "response_format": fmt})
    assert payload["stream"] is True
    assert payload["response_format"] == fmt


def test_prompt_length() -> None:
    assert work({"prompt": "x" * audio.MAX_PROMPT_CHARS})["prompt"] == "x" * 4096
    assert check_refused({"prompt": "x" * (audio.MAX_PROMPT_CHARS + 1)}).param == "prompt"


@pytest.mark.parametrize("language", ["xx", "english", "e"])
def test_unknown_language(language: str) -> None:
    assert check_refused({"language": language}).param == "language"


def test_english_only_model() -> None:
    english = entry(english_only=True)
    exc = check_refused({"language": "de"}, english)
    assert exc.param == "language"
    assert "English-only" in exc.message
    assert work({"language": "EN"}, english)["language"] == "en"
    assert work({"language": "en"}, english)["language"] == "en"
    # a multilingual model takes any language Whisper knows
    assert work({"language": "DE"}, entry(english_only=False))["language"] == "de"
    assert work({"language": "ja"})["language"] == "ja"


def test_to_work_payload() -> None:
    catalog = load_catalog()
    model = catalog.get("whisper-1")
    request = audio.parse_form(
        {"model": "whisper-1", "prompt": "Hello.", "temperature": "0.4", "language": "En"}
    )
    payload = audio.to_work(request, model, "translate", AUDIO_KEY)
    assert payload == {
        "model": TINY_EN,  # alias in, id out
        "audio": AUDIO_KEY,
        "task": "translate",
        "language": "en",
        "prompt": "Hello.",
        "temperature": 0.4,
        "words": False,
        "response_format": "json",
        "segments": True,
        "stream": False,
    }


@pytest.mark.parametrize(
    ("grains", "segments", "words"),
    [
        ([], True, False),
        (["segment"], True, False),
        (["word"], False, True),
        (["word", "segment"], True, True),
        (["segment", "segment"], True, False),
    ],
)
def test_to_work_granularities(grains: list[str], segments: bool, words: bool) -> None:
    fields: dict[str, Any] = {"response_format": "verbose_json"}
    if grains:
        fields["timestamp_granularities[]"] = grains
    payload = work(fields)
    assert payload["segments"] is segments
    assert payload["words"] is words


def test_to_work_defaults() -> None:
    payload = work({})
    assert payload["language"] is None
    assert payload["prompt"] is None
    assert payload["temperature"] == 0.0
    assert isinstance(payload["temperature"], float)


# -- parse_body (Batch API lines) ------------------------------------------------------------


def test_batch_body() -> None:
    body = {"model": "whisper-1", "file": "file-abc", "response_format": "verbose_json"}
    request = audio.parse_body(body)
    assert isinstance(request, audio.BatchAudioRequest)
    assert request.file == "file-abc"
    assert request.response_format == "verbose_json"
    assert audio.parse_body({"model": "m", "file": "file-abc"}).response_format == "json"


def test_batch_body_needs_file() -> None:
    assert refused({"model": "m"}, parse=audio.parse_body).param == "file"
    assert refused({"model": "m", "file": 3}, parse=audio.parse_body).param == "file"


def test_batch_body_needs_model() -> None:
    assert refused({"file": "file-abc"}, parse=audio.parse_body).param == "model"


def test_batch_body_refuses_stream() -> None:
    body = {"model": "m", "file": "file-abc", "stream": True}
    assert refused(body, parse=audio.parse_body).param == "stream"
    assert audio.parse_body({**body, "stream": False}).stream is False


@pytest.mark.parametrize("fmt", ["text", "srt", "vtt"])
def test_batch_body_refuses_text_formats(fmt: str) -> None:
    exc = refused(
        {"model": "m", "file": "file-abc", "response_format": fmt}, parse=audio.parse_body
    )
    assert exc.param == "response_format"
    assert fmt in exc.message


@pytest.mark.parametrize("body", [[], "text", None, 3, [{"model": "m", "file": "f"}]])
def test_batch_body_must_be_an_object(body: Any) -> None:
    refused(body, parse=audio.parse_body)


# -- catalog aliases -------------------------------------------------------------------------


def test_packaged_alias() -> None:
    catalog = load_catalog()
    found = catalog.find("whisper-1")
    assert found is not None
    assert found.id == TINY_EN
    assert catalog.get("whisper-1").id == TINY_EN
    assert catalog.get(TINY_EN).aliases == ("whisper-1",)
    assert catalog.aliases["whisper-1"] == TINY_EN
    assert catalog.find("whisper-2") is None
    with pytest.raises(CatalogError):
        catalog.get("whisper-2")


def test_names_lists_aliases_of_served_models_only() -> None:
    catalog = load_catalog()
    assert catalog.names([MINILM]) == [MINILM]
    assert catalog.names([MINILM, TINY_EN]) == [MINILM, TINY_EN, "whisper-1"]
    assert catalog.names(["Systran/faster-whisper-tiny"]) == ["Systran/faster-whisper-tiny"]


def test_user_alias_takes_the_name(tmp_path: Path) -> None:
    path = user_catalog(tmp_path, [audio_model("me/my-whisper", aliases=["whisper-1", "mine"])])
    catalog = load_catalog(path)
    assert catalog.get("whisper-1").id == "me/my-whisper"
    assert catalog.get("mine").id == "me/my-whisper"
    assert catalog.get(TINY_EN).id == TINY_EN  # still there under its id
    assert "whisper-1" not in catalog.names([TINY_EN])
    assert catalog.names(["me/my-whisper"]) == ["me/my-whisper", "whisper-1", "mine"]


def test_user_entry_replacing_the_packaged_one_drops_its_alias(tmp_path: Path) -> None:
    catalog = load_catalog(user_catalog(tmp_path, [audio_model(TINY_EN)]))
    assert catalog.get(TINY_EN).aliases == ()
    assert catalog.find("whisper-1") is None


def test_alias_equal_to_a_model_id(tmp_path: Path) -> None:
    path = user_catalog(tmp_path, [audio_model("me/my-whisper", aliases=[MINILM])])
    with pytest.raises(CatalogError, match="is a model id"):
        load_catalog(path)


@pytest.mark.parametrize("aliases", ["whisper-1", [1], [""], {"a": 1}, ["ok", None]])
def test_aliases_must_be_a_list_of_names(tmp_path: Path, aliases: Any) -> None:
    path = user_catalog(tmp_path, [audio_model("me/my-whisper", aliases=aliases)])
    with pytest.raises(CatalogError, match="aliases"):
        load_catalog(path)


def test_served_names_ids_not_aliases() -> None:
    catalog = load_catalog()
    with pytest.raises(CatalogError, match="alias") as info:
        catalog.served(["whisper-1"])
    assert TINY_EN in str(info.value)
    assert [e.id for e in catalog.served([TINY_EN])] == [TINY_EN]


def test_served_entry_by_alias() -> None:
    catalog = load_catalog()
    found = contract.served_entry(catalog, [MINILM, TINY_EN], "whisper-1", "audio")
    assert found.id == TINY_EN
    assert audio.served_entry(catalog, [TINY_EN], "whisper-1").id == TINY_EN


def test_served_entry_alias_of_an_unserved_model() -> None:
    catalog = load_catalog()
    with pytest.raises(ModelNotFound) as info:
        contract.served_entry(catalog, [MINILM], "whisper-1", "audio")
    assert info.value.status_code == 404
    assert info.value.param == "model"
    assert info.value.code == "model_not_found"
    assert MINILM in info.value.message


def test_served_entry_of_another_capability() -> None:
    catalog = load_catalog()
    with pytest.raises(InvalidRequest) as info:
        audio.served_entry(catalog, [MINILM, TINY_EN], MINILM)
    assert not isinstance(info.value, ModelNotFound)
    assert info.value.status_code == 400
    assert info.value.param == "model"
    assert "an embeddings model, not an audio model" in info.value.message
    with pytest.raises(InvalidRequest, match="an audio model, not an embeddings model"):
        contract.served_entry(catalog, [MINILM, TINY_EN], "whisper-1", "embeddings")
