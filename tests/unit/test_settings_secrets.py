"""A malformed setting stops laneway at start-up with a message naming the variable, and
never with the secrets that were set: not the malformed value (in a reversed or colonless
``name:key`` pair the "name" is the key), and not the other settings (pydantic's errors
would show a model-level validator's whole input). `laneway api` is run as an operator
runs it; ``Settings()`` directly for the many shapes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from configs.settings import Settings

ROOT = Path(__file__).resolve().parents[2]

# secrets set alongside whatever is malformed: none may be printed
OTHER_SECRETS = {
    "LANEWAY_API_KEY": "sk-STATIC-SECRET-1",
    "LANEWAY_REDIS_URL": "redis://:REDIS-SECRET-2@127.0.0.1:6379/0",
    "LANEWAY_DATABASE_URL": "postgresql://lw:DB-SECRET-3@127.0.0.1:5432/lw",
    "LANEWAY_S3_SECRET_ACCESS_KEY": "S3-SECRET-4",
}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(("LANEWAY_", "FLOWER_")):
            monkeypatch.delenv(key)


def laneway_api(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LANEWAY_", "FLOWER_"))}
    clean |= {"LANEWAY_DATA_DIR": str(tmp_path / "data"), **env}
    return subprocess.run(
        [sys.executable, "-m", "laneway", "api", "--port", "1"],
        env=clean,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_refused_quietly(
    done: subprocess.CompletedProcess[str], variable: str, secrets: list[str]
) -> None:
    said = done.stdout + done.stderr
    assert done.returncode != 0, said
    assert variable in said, said
    for secret in secrets:
        assert secret not in said, f"{secret!r} printed:\n{said}"


@pytest.mark.parametrize(
    "value",
    [
        "sk-SECRET123",  # a key alone
        "alice",  # a name alone
        "alice:",  # no key
        "bad name:sk-SECRET123",  # a name laneway refuses
        "sk+SECRET/123=:alice",  # reversed: the key where the name goes
        "ok:fine,sk-SECRET123",  # the second pair
    ],
)
def test_malformed_api_keys_are_refused_without_printing_them(value: str, tmp_path: Path) -> None:
    done = laneway_api({"LANEWAY_API_KEYS": value, **OTHER_SECRETS}, tmp_path)
    secrets = [part for pair in value.split(",") for part in pair.split(":") if part]
    assert_refused_quietly(done, "LANEWAY_API_KEYS", [value, *secrets, *OTHER_SECRETS.values()])


@pytest.mark.parametrize("value", ["ops-SECRET9", ":SECRET9", "ops:SECRET9,viewer"])
def test_a_malformed_flower_auth_is_refused_without_printing_it(value: str, tmp_path: Path) -> None:
    done = laneway_api({"LANEWAY_FLOWER_BASIC_AUTH": value, **OTHER_SECRETS}, tmp_path)
    assert_refused_quietly(done, "LANEWAY_FLOWER_BASIC_AUTH", ["SECRET9", *OTHER_SECRETS.values()])


def test_a_model_level_error_does_not_print_the_other_settings(tmp_path: Path) -> None:
    # the S3 pair is checked on the whole model: pydantic would show every input
    env = {**OTHER_SECRETS, "LANEWAY_FLOWER_BASIC_AUTH": "ops:FLOWER-SECRET-5"}
    del env["LANEWAY_S3_SECRET_ACCESS_KEY"]
    env |= {"LANEWAY_S3_ACCESS_KEY_ID": "AKIA-ID", "LANEWAY_API_KEYS": "alice:sk-ALICE-6"}
    done = laneway_api(env, tmp_path)
    assert_refused_quietly(done, "LANEWAY_S3_SECRET_ACCESS_KEY", [*env.values(), "sk-ALICE-6"])


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("LANEWAY_API_KEYS", "sk-SECRET123"),
        ("LANEWAY_API_KEYS", "SECRET123.with+plus:alice"),
        ("LANEWAY_API_KEYS", "a:b, c SECRET123 :d"),
        ("LANEWAY_FLOWER_BASIC_AUTH", "SECRET123"),
        ("LANEWAY_FLOWER_BASIC_AUTH", "SECRET123:"),
        ("LANEWAY_PORT", "SECRET123"),  # a type error shows no input either
        ("LANEWAY_API_WORKERS", "SECRET123"),
        ("LANEWAY_S3_ACCESS_KEY_ID", "SECRET123"),  # no secret to go with it
    ],
)
def test_no_validation_message_echoes_the_value(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    for name, secret in OTHER_SECRETS.items():
        if name != "LANEWAY_S3_SECRET_ACCESS_KEY":
            monkeypatch.setenv(name, secret)
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as excinfo:
        Settings()
    said = str(excinfo.value)
    assert "SECRET123" not in said, said
    for secret in OTHER_SECRETS.values():
        assert secret not in said, said
    assert "input_value" not in said


def test_the_pair_at_fault_is_named_by_its_position(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LANEWAY_API_KEYS", "alice:ka,bob:kb,sk-SECRET123")
    with pytest.raises(ValidationError, match=r"pair 3"):
        Settings()
    monkeypatch.setenv("LANEWAY_API_KEYS", "alice:ka,not valid:kb")
    with pytest.raises(ValidationError, match=r"the name of pair 2"):
        Settings()
