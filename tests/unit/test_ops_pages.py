"""The operator pages' pure decisions: what the API key guards (all but /health and, as a
setting, the docs' pages and assets),
an OpenAPI document without dangling ``$defs`` references, and how `laneway flower` is
started (its basic auth from the settings, kept off the command line)."""

from __future__ import annotations

import json
import os

import pytest
from pydantic import ValidationError

from api.middleware import is_protected
from configs.settings import Settings
from laneway.cli import flower_command

ASSETS = ("/docs/assets/swagger-ui-bundle.js", "/docs/assets/redoc.standalone.js")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(("LANEWAY_", "FLOWER_")):
            monkeypatch.delenv(key)


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json", *ASSETS])
def test_the_docs_assets_follow_the_pages(path: str) -> None:
    assert is_protected(path, protect_ops=True)
    assert not is_protected(path, protect_ops=False)


@pytest.mark.parametrize("protect_ops", [True, False])
def test_health_stays_open(protect_ops: bool) -> None:
    assert not is_protected("/health", protect_ops=protect_ops)


@pytest.mark.parametrize(
    "path", ["/v1/files", "/docsx", "/docs/assetsx/a.js", "/static/a.js", "/", "", "//v1/files"]
)
@pytest.mark.parametrize("protect_ops", [True, False])
def test_every_other_path_needs_the_key(path: str, protect_ops: bool) -> None:
    """Fail closed: a path no route knows (or one a future route adds) is guarded too."""
    assert is_protected(path, protect_ops=protect_ops)


def test_the_openapi_document_has_no_dangling_defs(monkeypatch: pytest.MonkeyPatch) -> None:
    from api.app import create_app

    monkeypatch.setenv("LANEWAY_MODELS", "laneway/fake-embeddings")
    schema = create_app(Settings()).openapi()
    text = json.dumps(schema)
    assert "$defs" not in text
    for ref in ("ChatMessage", "ImagePart", "TextPart"):
        assert f'"#/components/schemas/{ref}"' in text
        assert ref in schema["components"]["schemas"]


def _settings(**env: str) -> Settings:
    return Settings(redis_url="redis://127.0.0.1:6379/0", **env)  # type: ignore[arg-type]


def test_flower_gets_the_basic_auth_in_its_environment() -> None:
    argv, env = flower_command(
        _settings(flower_basic_auth="ops:pw"), "127.0.0.1", 5555, {"PATH": "/bin"}
    )
    assert env == {
        "PATH": "/bin",
        "FLOWER_BASIC_AUTH": "ops:pw",
        "CELERY_BROKER_URL": "redis://127.0.0.1:6379/0",
    }
    assert not any("pw" in arg for arg in argv)
    assert "--broker" not in argv  # the broker URL is in the environment (tests/unit/test_cli.py)
    assert {"flower", "--port=5555", "--address=127.0.0.1"} <= set(argv)


def test_flower_keeps_its_own_variable_without_the_setting() -> None:
    _, env = flower_command(_settings(), "0.0.0.0", 5555, {"FLOWER_BASIC_AUTH": "a:b"})
    assert env["FLOWER_BASIC_AUTH"] == "a:b"
    _, env = flower_command(_settings(), "0.0.0.0", 5555, {})
    assert "FLOWER_BASIC_AUTH" not in env


def test_the_setting_overrides_flowers_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LANEWAY_FLOWER_BASIC_AUTH", "ops:new,viewer:also")
    _, env = flower_command(_settings(), "0.0.0.0", 5555, {"FLOWER_BASIC_AUTH": "a:old"})
    assert env["FLOWER_BASIC_AUTH"] == "ops:new,viewer:also"


@pytest.mark.parametrize("bad", ["", "nocolon", "user:", ":password", "a:b,c"])
def test_a_malformed_basic_auth_is_refused(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv("LANEWAY_FLOWER_BASIC_AUTH", bad)
    with pytest.raises(ValidationError, match="user:password"):
        Settings()
