"""docker-compose.yml: authentication is required, and Redis and Postgres stay off the host.

There is no Docker engine in the test environment, so the file is loaded with PyYAML and
Compose's variable interpolation is reimplemented here for the forms the file may use:
`$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?err}`, `${VAR?err}`, `$$`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

COMPOSE_FILE = Path(__file__).resolve().parents[2] / "docker-compose.yml"
REQUIRED = {"api": "LANEWAY_API_KEY", "flower": "FLOWER_BASIC_AUTH"}
DATA_PORTS = {"5432", "6379"}  # Postgres, Redis (container side)
LOOPBACK = {"127.0.0.1", "::1", "localhost"}

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_TOKEN = re.compile(
    rf"\$(?:(?P<escaped>\$)"
    rf"|\{{(?P<braced>{_NAME})(?:(?P<op>:?[-?])(?P<arg>[^}}]*))?\}}"
    rf"|(?P<bare>{_NAME})"
    rf"|(?P<invalid>))"
)


class InterpolationError(ValueError):
    """A required variable is missing, or a `$` starts no valid expression."""


def interpolate(value: str, env: Mapping[str, str], errors: list[str]) -> str:
    """Compose's rules for one string; messages of missing required variables go to `errors`."""

    def substitute(m: re.Match[str]) -> str:
        if m["escaped"]:
            return "$"
        if m["invalid"] is not None:
            raise InterpolationError(f"invalid interpolation format in {value!r}")
        name = m["braced"] or m["bare"]
        op, arg = m["op"], m["arg"] or ""
        current = env.get(name)
        # with a colon, an empty value counts as missing
        missing = current is None or (op is not None and op.startswith(":") and current == "")
        if op in ("-", ":-"):
            return arg if missing else current or ""
        if op in ("?", ":?"):
            if missing:
                errors.append(f"required variable {name} is missing a value: {arg}")
            return current or ""
        return current or ""

    return _TOKEN.sub(substitute, value)


def interpolate_all(node: Any, env: Mapping[str, str], errors: list[str]) -> Any:
    """Interpolate every string (keys and values) in a loaded YAML tree."""
    if isinstance(node, str):
        return interpolate(node, env, errors)
    if isinstance(node, dict):
        return {
            interpolate_all(k, env, errors): interpolate_all(v, env, errors)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [interpolate_all(v, env, errors) for v in node]
    return node


def render(env: Mapping[str, str]) -> dict[str, Any]:
    """The compose file as `docker compose config` would see it under `env`."""
    errors: list[str] = []
    config = interpolate_all(yaml.safe_load(COMPOSE_FILE.read_text()), env, errors)
    if errors:
        raise InterpolationError("; ".join(errors))
    return config


def host_ip_and_target(port: str | int | dict[str, Any]) -> tuple[str, str]:
    """(host IP, container port) of a `ports:` entry, short or long syntax; '' = all."""
    if isinstance(port, dict):
        return str(port.get("host_ip", "")), str(port["target"])
    spec = str(port).split("/")[0]
    if spec.startswith("["):  # [::1]:5432:5432
        ip, _, rest = spec[1:].partition("]:")
        return ip, rest.split(":")[-1]
    parts = spec.split(":")
    return (parts[0] if len(parts) == 3 else ""), parts[-1]


@pytest.mark.parametrize(("service", "var"), sorted(REQUIRED.items()))
def test_auth_variables_are_required_interpolations(service: str, var: str) -> None:
    raw = yaml.safe_load(COMPOSE_FILE.read_text())["services"][service]["environment"]
    match = re.fullmatch(rf"\$\{{{var}:\?(?P<message>[^}}]+)\}}", raw[var])
    assert match, f"{service}.{var} should be ${{{var}:?message}}, got {raw[var]!r}"
    assert var in match["message"]


def test_interpolation_rules() -> None:
    env = {"SET": "x", "EMPTY": ""}
    cases = {
        "$$SET ${SET} $SET": "$SET x x",
        "${UNSET}|${EMPTY:-d}|${EMPTY-d}|${UNSET-d}|${SET:-d}": "|d||d|x",
        "${EMPTY?e}${SET:?e}": "x",
    }
    for template, expected in cases.items():
        assert interpolate(template, env, []) == expected
    for template in ("${UNSET?e}", "${UNSET:?e}", "${EMPTY:?e}"):
        errors: list[str] = []
        interpolate(template, env, errors)
        assert errors, template
    with pytest.raises(InterpolationError):
        interpolate("${NOT-CLOSED", env, [])


def test_empty_environment_is_refused_naming_both_variables() -> None:
    with pytest.raises(InterpolationError) as excinfo:
        render({})
    for var in REQUIRED.values():
        assert var in str(excinfo.value)


@pytest.mark.parametrize("empty", sorted(REQUIRED.values()))
def test_an_empty_value_is_refused(empty: str) -> None:
    env = {var: "set" for var in REQUIRED.values()} | {empty: ""}
    with pytest.raises(InterpolationError, match=empty):
        render(env)


def test_renders_with_both_variables_set() -> None:
    env = {"LANEWAY_API_KEY": "key", "FLOWER_BASIC_AUTH": "admin:secret"}
    services = render(env)["services"]
    for service, var in REQUIRED.items():
        assert services[service]["environment"][var] == env[var]


def test_postgres_and_redis_are_not_published_on_all_interfaces() -> None:
    env = {var: "set" for var in REQUIRED.values()}
    for name, service in render(env)["services"].items():
        is_data_store = str(service.get("image", "")).startswith(("postgres", "redis"))
        if is_data_store:
            assert service.get("network_mode") != "host", name
        for port in service.get("ports", []):
            ip, target = host_ip_and_target(port)
            if is_data_store or target in DATA_PORTS:
                assert ip in LOOPBACK, f"{name} publishes {port!r} on all interfaces"
