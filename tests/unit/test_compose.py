"""docker-compose.yml and docker/Dockerfile.*, checked without a Docker engine.

Authentication is required, Redis and Postgres stay off the host, and the API and Flower
are published on its loopback unless LANEWAY_PUBLISH_ADDR widens it on purpose. Every
`laneway` command (compose `command`, Dockerfile CMD/ENTRYPOINT) parses with the real CLI
parser and names real capabilities, devices and catalog models; every served capability
has a worker; every `LANEWAY_*` variable set is a real setting; health checks hit real,
open API routes with a tool the image has; published ports are the ports the commands
listen on; every COPY/ADD source exists and survives .dockerignore. `docker compose
config` runs where Compose is installed: the plugin, or a standalone `docker-compose` from
1.28 on (the first with profiles; Debian's 1.29, which CI installs, reads the file as the
plugin does).

The compose file is loaded with PyYAML and Compose's variable interpolation is
reimplemented here for the forms the file may use: `$VAR`, `${VAR}`, `${VAR:-default}`,
`${VAR-default}`, `${VAR:?err}`, `${VAR?err}`, `$$`. Each checker returns a list of
problems naming the service or file:line, so one test reports every mistake at once.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.dashboards import DASHBOARD, DASHBOARDS, PROMETHEUS_CONFIG, PROVISIONING
from tests.deploy_checks import (
    _NAME,
    AUTH_ENV,
    LOOPBACK,
    ROOT,
    Dockerfile,
    build_problems,
    cli_variables,
    command_problems,
    compose_env_problems,
    dependency_problems,
    dockerfile_problems,
    dockerignore_rules,
    env_problems,
    environment,
    exec_form,
    healthcheck_problems,
    host_ip_and_target,
    ignored,
    is_route,
    laneway_commands,
    laneway_problems,
    listening,
    parsed_commands,
    port_problems,
    service_command,
    service_dockerfile,
    setting_variables,
    shell_words,
    simple_commands,
    worker_problems,
)

COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))
REQUIRED = {"api": "LANEWAY_API_KEY", "flower": "FLOWER_BASIC_AUTH"}
DATA_PORTS = {"5432", "6379"}  # Postgres, Redis (container side)
# the API and Flower: published on the host's loopback unless LANEWAY_PUBLISH_ADDR widens it
HOST_PORTS = {"api": "8000", "flower": "5555"}
# `docker compose --profile monitoring up`: Prometheus scraping the API, Grafana showing it
MONITORING = ("prometheus", "grafana")
GRAFANA_PORT = "3000"
PROMETHEUS_PORT = 9090  # the image's default --web.listen-address
PINNED = re.compile(r"[a-z0-9./-]+:v?\d+\.\d+\.\d+")

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


def published(services: Mapping[str, Any]) -> dict[str, list[tuple[str, str]]]:
    """(host IP, container port) of every published port, by service."""
    return {
        name: [host_ip_and_target(port) for port in service.get("ports") or []]
        for name, service in services.items()
    }


def test_nothing_is_published_beyond_loopback_by_default() -> None:
    ports = published(render(AUTH_ENV)["services"])
    for name, target in HOST_PORTS.items():
        assert [t for _, t in ports[name]] == [target], ports[name]
    for name, entries in ports.items():
        for ip, target in entries:
            assert ip in LOOPBACK, f"{name} publishes {target} on {ip or 'all interfaces'}"


def test_the_publish_address_widens_the_api_and_flower_on_purpose() -> None:
    services = render(AUTH_ENV | {"LANEWAY_PUBLISH_ADDR": "0.0.0.0"})["services"]
    ports = published(services)
    for name, target in HOST_PORTS.items():
        assert ports[name] == [("0.0.0.0", target)]
    assert not port_problems(services), report(port_problems(services))
    # Redis and Postgres stay unpublished whatever it says
    assert not [p for entries in ports.values() for p in entries if p[1] in DATA_PORTS]


# --- the real files ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return render(AUTH_ENV)


@pytest.fixture(scope="module")
def services(config: dict[str, Any]) -> dict[str, Any]:
    return config["services"]  # type: ignore[no-any-return]


def report(problems: list[str]) -> str:
    return "\n" + "\n".join(problems)


def test_the_checks_see_every_laneway_command(services: dict[str, Any]) -> None:
    # not vacuous: each image built here runs laneway, and all the server commands appear
    seen = set()
    for name, service in services.items():
        commands = laneway_commands(service_command(service))
        assert commands or "build" not in service, f"{name} runs no laneway command"
        seen |= {args[0] for args in commands}
    assert {"api", "migrate", "worker", "workers", "flower"} <= seen


def test_builds_name_existing_dockerfiles(services: dict[str, Any]) -> None:
    problems = build_problems(services)
    assert not problems, report(problems)
    used = {df.name for s in services.values() if (df := service_dockerfile(s))}
    assert used == {df.relative_to(ROOT).as_posix() for df in DOCKERFILES}


def test_service_commands_parse_with_the_cli(services: dict[str, Any]) -> None:
    problems = command_problems(services)
    assert not problems, report(problems)


def test_environment_sets_only_real_settings(config: dict[str, Any]) -> None:
    raw = yaml.safe_load(COMPOSE_FILE.read_text())  # the x- blocks as written
    extensions = {k: v for k, v in raw.items() if k.startswith("x-")}
    problems = compose_env_problems(interpolate_all(extensions, AUTH_ENV, []) | config)
    assert not problems, report(problems)


def test_every_served_capability_has_a_worker(services: dict[str, Any]) -> None:
    problems = worker_problems(services)
    assert not problems, report(problems)


def test_health_checks_hit_real_routes(services: dict[str, Any]) -> None:
    problems = healthcheck_problems(services)
    assert not problems, report(problems)


def test_published_ports_are_the_listening_ports(services: dict[str, Any]) -> None:
    problems = port_problems(services)
    assert not problems, report(problems)


def test_dependencies_can_be_met(services: dict[str, Any]) -> None:
    problems = dependency_problems(services)
    assert not problems, report(problems)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile(path: Path) -> None:
    problems = dockerfile_problems(Dockerfile.load(path))
    assert not problems, report(problems)


# --- the monitoring profile ----------------------------------------------------------------


def mounts(service: Mapping[str, Any]) -> dict[Path, str]:
    """Host path (resolved) -> container path of a service's bind mounts (short syntax)."""
    out = {}
    for volume in service.get("volumes") or []:
        source, target = str(volume).split(":")[:2]
        if source.startswith((".", "/")):
            out[(ROOT / source).resolve()] = target
    return out


def option(words: list[str], flag: str) -> str | None:
    """The value of `--flag=value` or `--flag value` among `words`."""
    for i, word in enumerate(words):
        if word.startswith(f"{flag}="):
            return word.split("=", 1)[1]
        if word == flag and i + 1 < len(words):
            return words[i + 1]
    return None


def prometheus_words(service: Mapping[str, Any]) -> list[str]:
    """The words of the Prometheus service's `sh -c` entrypoint."""
    entrypoint = service["entrypoint"]
    assert entrypoint[:2] == ["/bin/sh", "-c"], entrypoint
    return shell_words(entrypoint[2])


def test_monitoring_services_are_in_their_profile(services: dict[str, Any]) -> None:
    for name in MONITORING:
        service = services[name]
        assert service["profiles"] == ["monitoring"], name
        assert PINNED.fullmatch(service["image"]), f"{name}: pin a version, not {service['image']}"
        assert "build" not in service, name
    # the default `docker compose up` starts neither
    assert not [
        n
        for n, s in services.items()
        if n not in MONITORING and s.get("profiles") == ["monitoring"]
    ]


def test_prometheus_scrapes_the_api_service(services: dict[str, Any]) -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    [job] = config["scrape_configs"]
    [target] = [t for static in job["static_configs"] for t in static["targets"]]
    host, port = target.rsplit(":", 1)
    api = services[host]
    [parsed] = [p for p in parsed_commands(service_command(api)) if p.command == "api"]
    served = listening(parsed, environment(api))
    assert served is not None and int(port) == served[1], (target, served)
    assert is_route(("laneway/fake-embeddings",), job["metrics_path"])
    prometheus = services["prometheus"]
    words = prometheus_words(prometheus)
    config_file = option(words, "--config.file")
    assert mounts(prometheus)[PROMETHEUS_CONFIG] == config_file
    # the bearer key: the API's key, written to the file the scrape reads before it starts
    assert prometheus["environment"]["LANEWAY_API_KEY"] == api["environment"]["LANEWAY_API_KEY"]
    credentials = job["authorization"]["credentials_file"]
    script = prometheus["entrypoint"][2]
    assert f'"$LANEWAY_API_KEY" > {credentials}' in script, script
    assert words[words.index("exec") + 1] == "/bin/prometheus"
    assert option(words, "--web.listen-address") is None  # the default port, 9090
    assert not prometheus.get("ports")  # Grafana reaches it on the compose network


def test_prometheus_key_is_the_required_api_key() -> None:
    raw = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    assert (
        raw["prometheus"]["environment"]["LANEWAY_API_KEY"]
        == (raw["api"]["environment"]["LANEWAY_API_KEY"])
    )
    # `$$`: the container's shell, not Compose, expands it
    assert '"$$LANEWAY_API_KEY"' in raw["prometheus"]["entrypoint"][2]


def test_grafana_is_provisioned_with_the_dashboard(services: dict[str, Any]) -> None:
    grafana = services["grafana"]
    bound = mounts(grafana)
    assert bound[PROVISIONING] == "/etc/grafana/provisioning"
    [provider] = yaml.safe_load(next((PROVISIONING / "dashboards").glob("*.yml")).read_text())[
        "providers"
    ]
    assert bound[DASHBOARDS] == provider["options"]["path"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{bound[DASHBOARDS]}/{DASHBOARD.name}"
    [source] = yaml.safe_load(next((PROVISIONING / "datasources").glob("*.yml")).read_text())[
        "datasources"
    ]
    assert source["url"] == f"http://prometheus:{PROMETHEUS_PORT}"
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_started"
    # read-only for whoever reaches it: anonymous viewers, nobody logs in
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert env["GF_AUTH_DISABLE_LOGIN_FORM"] == "true"
    assert env["GF_AUTH_BASIC_ENABLED"] == "false"


def test_grafana_is_on_loopback_unless_widened_on_purpose() -> None:
    assert published(render(AUTH_ENV)["services"])["grafana"] == [("127.0.0.1", GRAFANA_PORT)]
    widened = render(AUTH_ENV | {"GRAFANA_PUBLISH_ADDR": "0.0.0.0"})["services"]
    assert published(widened)["grafana"] == [("0.0.0.0", GRAFANA_PORT)]
    # the API's own knob leaves it alone
    api_wide = render(AUTH_ENV | {"LANEWAY_PUBLISH_ADDR": "0.0.0.0"})["services"]
    assert published(api_wide)["grafana"] == [("127.0.0.1", GRAFANA_PORT)]


def compose_command() -> list[str]:
    """`docker compose`, or a standalone `docker-compose` 1.28 or later; skips the test
    when neither is here."""
    reasons = []
    if docker := shutil.which("docker"):
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, timeout=60
        )
        if probe.returncode == 0:
            return [docker, "compose"]
        said = (probe.stderr.strip().splitlines() or [""])[0][:80]
        reasons.append(f"the docker CLI has no compose plugin ({said})")
    else:
        reasons.append("no docker CLI")
    if standalone := shutil.which("docker-compose"):
        probe = subprocess.run([standalone, "version"], capture_output=True, text=True, timeout=60)
        found = re.search(r"version v?(\d+)\.(\d+)", probe.stdout)
        if probe.returncode == 0 and found and (int(found[1]), int(found[2])) >= (1, 28):
            return [standalone]
        reasons.append(f"docker-compose is older than 1.28 ({probe.stdout.strip()[:60]})")
    else:
        reasons.append("no docker-compose")
    pytest.skip("no Compose to run `docker compose config`: " + "; ".join(reasons))


def test_docker_compose_config(tmp_path: Path) -> None:
    compose = compose_command()
    no_env = tmp_path / "empty.env"  # not the project's .env; Compose 1.x wants a file
    no_env.write_text("")
    profiles = ["--profile", "gpu", "--profile", "monitoring"]
    base = [*compose, "--env-file", str(no_env), "-f", str(COMPOSE_FILE), *profiles]
    # the defaults, whatever this shell sets
    clean = {
        k: v for k, v in os.environ.items() if k not in AUTH_ENV and k != "LANEWAY_PUBLISH_ADDR"
    }
    done = subprocess.run(
        [*base, "config", "--quiet"],
        env=clean | AUTH_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    shown = subprocess.run(
        [*base, "config"], env=clean | AUTH_ENV, capture_output=True, text=True, timeout=120
    )
    assert shown.returncode == 0, shown.stderr
    ports = published(yaml.safe_load(shown.stdout)["services"])
    assert set(MONITORING) <= set(ports)
    assert ports["grafana"] == [("127.0.0.1", GRAFANA_PORT)], ports["grafana"]
    for name, target in HOST_PORTS.items():
        assert [t for _, t in ports[name]] == [target], ports[name]
        assert all(ip in LOOPBACK for ip, _ in ports[name]), ports[name]
    refused = subprocess.run(
        [*base, "config", "--quiet"], env=clean, capture_output=True, text=True, timeout=120
    )
    assert refused.returncode != 0
    assert "LANEWAY_API_KEY" in refused.stderr or "FLOWER_BASIC_AUTH" in refused.stderr


# --- the checkers catch what they are for --------------------------------------------------

BROKEN = """
x-env: &env
  LANEWAY_REDIS_URL: redis://redis:6379/0
  LANEWAY_MODLES: sentence-transformers/all-MiniLM-L6-v2
services:
  api:
    build: {context: ., dockerfile: docker/Dockerfile.api}
    environment:
      <<: *env
      LANEWAY_MODELS: sentence-transformers/all-MiniLM-L6-v2,Systran/faster-whisper-tiny.en
    command: ["sh", "-c", "laneway migrate && exec laneway api --host 0.0.0.0 --port 8000"]
    ports: ["8080:8080"]
    healthcheck:
      test: ["CMD-SHELL", "curl -f http://localhost:8000/healthz || exit 1"]
  api-two:
    environment: {LANEWAY_PORT: "9000", LANEWAY_API_WORKERS: "0"}
    command: laneway api --host 0.0.0.0 --no-migrat
  api-three:
    environment: {LANEWAY_MODELS: laneway/fake-embeddings}
    command: ["laneway", "api", "--port", "8000"]
    ports: ["8000:8000"]
    healthcheck:
      test: ["CMD", "python", "-c", "import urllib.request as u; u.urlopen('http://api:8001/v1/models')"]
  embeddings:
    build: {context: ., dockerfile: docker/Dockerfile.worker-gpu}
    environment: *env
    command: ["laneway", "worker", "--capability", "embedding", "--device", "gpu0"]
    depends_on:
      api: {condition: service_healthy}
  chat:
    environment: {LANEWAY_MODELS: "sentence-transformers/all-MiniLM-L6-v2"}
    command: ["laneway", "workers", "--capability", "chat", "--gpus", "first"]
    depends_on:
      redis: {condition: service_healthy}
  redis:
    image: redis:7-alpine
  flower:
    command: ["laneway", "flower", "--port", "5555"]
    ports: ["5555:5555"]
"""


@pytest.fixture
def broken() -> dict[str, Any]:
    return yaml.safe_load(BROKEN)  # type: ignore[no-any-return]


def assert_reported(problems: list[str], *expected: tuple[str, str]) -> None:
    """Each (where, what) appears together in one problem."""
    for where, what in expected:
        assert any(p.startswith(f"{where}:") and what in p for p in problems), (
            f"{where}: {what!r} not reported in" + report(problems)
        )


def test_broken_commands_are_reported(broken: dict[str, Any]) -> None:
    problems = command_problems(broken["services"])
    assert_reported(
        problems,
        ("api-two", "unrecognized arguments: --no-migrat"),
        ("embeddings", "unknown capability 'embedding'"),
        ("embeddings", "--device takes auto, cpu or cuda:N, not 'gpu0'"),
        ("chat", "--gpus takes all or indices, not 'first'"),
    )
    assert not [p for p in problems if p.startswith(("api:", "api-three:", "flower:"))]


def test_bad_laneway_command_lines() -> None:
    assert_reported(
        laneway_problems(["serve"], "s"),
        ("s", "invalid choice: 'serve'"),
    )
    assert_reported(
        laneway_problems(["worker", "--device", "cpu"], "s"),
        ("s", "the following arguments are required: --capability"),
    )
    whisper = "Systran/faster-whisper-tiny.en"
    assert_reported(
        laneway_problems(["worker", "--capability", "embeddings", "--models", whisper], "s"),
        ("s", f"--models names {whisper!r}, a model of 'audio'"),
    )
    assert_reported(
        laneway_problems(["workers", "--models", "no-such/model"], "s"),
        ("s", "--models names 'no-such/model', no catalog id"),
    )
    assert laneway_problems(["up", "--device", "cuda:1"], "s") == []


def test_unknown_and_invalid_variables_are_reported(broken: dict[str, Any]) -> None:
    problems = compose_env_problems(broken)
    assert_reported(
        problems,
        ("x-env", "LANEWAY_MODLES is not a laneway setting"),
        ("api", "LANEWAY_MODLES is not a laneway setting"),  # merged in through <<
        ("api-two", "api_workers"),
    )
    assert_reported(
        env_problems({"LANEWAY_MODELS": "no-such/model"}, "svc"),
        ("svc", "unknown model(s) no-such/model"),
    )
    assert_reported(
        env_problems({"LANEWAY_MODELS": "whisper-1"}, "svc"),
        ("svc", "names catalog ids, not aliases"),
    )
    fine = {"POSTGRES_USER": "x", "LANEWAY_LOG_LEVEL": "DEBUG", "laneway_task_events": "1"}
    assert env_problems(fine | {"LANEWAY_MODEL_CONFIG": "/m.yaml"}, "svc") == []
    assert "LANEWAY_LOG_LEVEL" in cli_variables()
    assert "LANEWAY_MODEL_CONFIG_PATH" not in setting_variables()  # the alias is read


def test_a_capability_without_a_worker_is_reported(broken: dict[str, Any]) -> None:
    services = broken["services"]
    services["embeddings"]["command"][3] = "embeddings"
    problems = worker_problems(services)
    assert_reported(
        problems,
        ("api", "serves Systran/faster-whisper-tiny.en (audio) but no service"),
        ("chat", "has no model of that capability"),
    )
    assert not [p for p in problems if "(embeddings)" in p]


def test_broken_health_checks_are_reported(broken: dict[str, Any]) -> None:
    problems = healthcheck_problems(broken["services"])
    assert_reported(
        problems,
        ("api", "healthcheck runs curl, which docker/Dockerfile.api does not install"),
        ("api", "GET /healthz, no route of the API"),
        ("api-two", "runs `laneway api` but has no healthcheck"),
        ("api-three", "asks api, not the container itself"),
        ("api-three", "asks port 8001, the API listens on 8000"),
        ("api-three", "/v1/models, which needs the API key"),
    )


def test_ports_and_dependencies_are_checked(broken: dict[str, Any]) -> None:
    services = broken["services"]
    assert_reported(
        port_problems(services),
        ("api", "publishes '8080:8080', but its command listens on 8000"),
        ("api-three", "listens on 127.0.0.1, out of reach"),
        ("flower", "listens on 127.0.0.1, out of reach"),
    )
    assert_reported(
        dependency_problems(services),
        ("embeddings", "waits for api to be healthy, which it never is"),
        ("chat", "waits for redis to be healthy; it has no check"),
    )
    assert_reported(
        build_problems(services),
        ("embeddings", "build.dockerfile 'docker/Dockerfile.worker-gpu' does not exist"),
    )


BROKEN_DOCKERFILE = """\
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \\
    LANEWAY_FILESTORE=/data/files
WORKDIR /app
COPY pyproject.toml README.md ./
RUN pip install '.[postgres]'
COPY api ./api
COPY no-such-dir ./x
COPY tests ./tests
COPY --from=build /wheels /wheels
EXPOSE 8000
CMD ["sh", "-c", "laneway migrate && exec laneway api --prot 8000"]
"""


def test_dockerfile_problems_name_file_and_line() -> None:
    problems = dockerfile_problems(Dockerfile.parse("docker/Dockerfile.test", BROKEN_DOCKERFILE))
    assert_reported(
        problems,
        ("docker/Dockerfile.test:2", "LANEWAY_FILESTORE is not a laneway setting"),
        ("docker/Dockerfile.test:6", "`pip install .` runs before api, configs"),
        ("docker/Dockerfile.test:8", "COPY no-such-dir: no such path in the context"),
        ("docker/Dockerfile.test:9", "COPY tests: excluded by .dockerignore"),
        ("docker/Dockerfile.test:12", "unrecognized arguments: --prot"),
    )
    assert len(problems) == 5, report(problems)
    listens_locally = BROKEN_DOCKERFILE.replace("--prot 8000", "--port 9000")
    assert_reported(
        dockerfile_problems(Dockerfile.parse("D", listens_locally)),
        ("D:12", "listens on 127.0.0.1 only"),
        ("D:12", "listens on 9000, not EXPOSEd"),
    )


def test_shell_commands_are_split() -> None:
    script = "A=1 laneway migrate && exec laneway api --port 8000; echo done | cat"
    assert simple_commands(["sh", "-c", script]) == [
        ["laneway", "migrate"],
        ["laneway", "api", "--port", "8000"],
        ["echo", "done"],
        ["cat"],
    ]
    assert laneway_commands("python -m laneway.cli worker --capability audio") == [
        ["worker", "--capability", "audio"]
    ]
    assert laneway_commands(exec_form("laneway flower")) == [["flower"]]


def test_dockerignore_rules() -> None:
    rules = dockerignore_rules("**/__pycache__\n*.egg-info\n/data\ntests\n!tests/keep\n")
    assert ignored("api/routes/__pycache__/x.pyc", rules)
    assert ignored("laneway.egg-info", rules)
    assert ignored("data/x", rules)
    assert ignored("tests/unit", rules)
    assert not ignored("tests/keep", rules)
    assert not ignored("api", rules)
    assert not ignored("sub/laneway.egg-info", rules)  # * does not cross folders
