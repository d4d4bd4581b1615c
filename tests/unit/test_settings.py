"""configs.settings: env parsing and validation messages."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from configs.settings import Settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("LANEWAY_"):
            monkeypatch.delenv(key)


def test_defaults() -> None:
    s = Settings()
    assert s.models == ["sentence-transformers/all-MiniLM-L6-v2"]
    assert s.redis_url is None
    assert s.max_request_bytes == 16 * 1024 * 1024
    assert s.max_embedding_inputs == 2048
    assert s.embedding_cache_size == 0


def test_models_comma_list_is_split_and_stripped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LANEWAY_MODELS", " a/b , c/d,,e ")
    assert Settings().models == ["a/b", "c/d", "e"]


def test_models_single_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LANEWAY_MODELS", "laneway/fake-embeddings")
    assert Settings().models == ["laneway/fake-embeddings"]


@pytest.mark.parametrize("value", ["", " , ,"])
def test_models_empty_is_refused_with_a_clear_message(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("LANEWAY_MODELS", value)
    with pytest.raises(ValidationError, match="LANEWAY_MODELS must name at least one"):
        Settings()


@pytest.mark.parametrize(
    ("name", "value", "field"),
    [
        ("LANEWAY_LIVE_QUEUE_MAX", "0", "live_queue_max"),
        ("LANEWAY_MAX_REQUEST_BYTES", "10", "max_request_bytes"),
        ("LANEWAY_REQUEST_TIMEOUT_S", "0", "request_timeout_s"),
        ("LANEWAY_REQUEST_TIMEOUT_S", "soon", "request_timeout_s"),
        ("LANEWAY_PORT", "http", "port"),
        ("LANEWAY_EMBEDDING_CACHE_SIZE", "-1", "embedding_cache_size"),
        ("LANEWAY_AUTO_DOWNLOAD", "perhaps", "auto_download"),
    ],
)
def test_invalid_values_name_the_field(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, field: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as info:
        Settings()
    assert field in str(info.value)


def test_typed_values_are_parsed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LANEWAY_LIVE_QUEUE_MAX", "7")
    monkeypatch.setenv("LANEWAY_REQUEST_TIMEOUT_S", "1.5")
    monkeypatch.setenv("LANEWAY_AUTO_DOWNLOAD", "true")
    monkeypatch.setenv("LANEWAY_MODEL_CONFIG", str(tmp_path / "extra.yaml"))
    monkeypatch.setenv("LANEWAY_REDIS_URL", "redis://127.0.0.1:1/0")
    s = Settings()
    assert s.live_queue_max == 7
    assert s.request_timeout_s == 1.5
    assert s.auto_download is True
    assert s.model_config_path == tmp_path / "extra.yaml"
    assert s.effective_redis_url == "redis://127.0.0.1:1/0"


def test_derived_paths(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LANEWAY_DATA_DIR", str(tmp_path))
    s = Settings()
    assert s.effective_database_url == f"sqlite:///{(tmp_path / 'laneway.db').resolve()}"
    assert s.effective_file_store == tmp_path / "files"
    monkeypatch.setenv("LANEWAY_DATABASE_URL", "postgresql://u@h/db")
    monkeypatch.setenv("LANEWAY_FILE_STORE", str(tmp_path / "store"))
    s = Settings()
    assert s.effective_database_url == "postgresql://u@h/db"
    assert s.effective_file_store == tmp_path / "store"


def test_redis_url_required_outside_laneway_up() -> None:
    with pytest.raises(RuntimeError, match="LANEWAY_REDIS_URL is not set"):
        _ = Settings().effective_redis_url
