"""The deployment checks of tests/unit/test_compose.py: parse docker-compose.yml and the
Dockerfiles and report, per service or Dockerfile line, what would not run (a laneway
command the CLI refuses, a LANEWAY_ variable that is no setting, a health check on no
route, a COPY of a missing path, ...). Each checker returns a list of problems."""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import posixpath
import re
import shlex
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

from pydantic import ValidationError
from starlette.routing import Match

from configs.capabilities import CAPABILITIES
from configs.catalog import Catalog, CatalogError, load_catalog
from configs.settings import Settings
from laneway.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LOOPBACK = {"127.0.0.1", "::1", "localhost"}
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"


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


# --- the checkers --------------------------------------------------------------------------
# Each returns a list of problems, each naming the service or Dockerfile line at fault.

AUTH_ENV = {"LANEWAY_API_KEY": "key", "FLOWER_BASIC_AUTH": "admin:secret"}
SHELLS = {"sh", "/bin/sh", "bash", "/bin/bash"}
SEPARATORS = {"&&", "||", ";", "|", "&"}
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")  # workers/launcher.py pin_device
GPUS = re.compile(r"all|\d+(,\d+)*")  # workers/placement.py parse_gpus
ALL_INTERFACES = {"0.0.0.0", "::"}
HTTP_FETCHERS = {"curl", "wget"}
URL = re.compile(
    r"https?://(?P<host>\[[^\]]+\]|[^/:'\"\s]+)(?::(?P<port>\d+))?(?P<path>/[^'\"\s?#)]*)?"
)
DEFAULT_MODELS: list[str] = Settings.model_fields["models"].get_default(call_default_factory=True)
PIP_INSTALL_SELF = re.compile(r"pip3? install\b[^&;|]*\s['\"]?\.(\[[^\]]*\])?['\"]?(\s|$)")


@functools.cache
def catalog() -> Catalog:
    return load_catalog()


def shell_words(script: str) -> list[str]:
    """A shell script's words, with && || ; | & as words of their own."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def simple_commands(command: str | list[Any]) -> list[list[str]]:
    """The commands a compose `command` or a Dockerfile CMD runs: an exec list, a string
    (split as Compose splits it), or `sh -c SCRIPT` with SCRIPT cut at && || ; | &."""
    argv = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
    if not (len(argv) >= 3 and argv[0] in SHELLS and argv[1] == "-c"):
        return [argv] if argv else []
    commands: list[list[str]] = [[]]
    for word in shell_words(argv[2]):
        if word in SEPARATORS:
            commands.append([])
        else:
            commands[-1].append(word)
    result = []
    for words in commands:
        while words and (words[0] == "exec" or re.fullmatch(rf"{_NAME}=.*", words[0])):
            words = words[1:]
        if words:
            result.append(words)
    return result


def laneway_args(argv: list[str]) -> list[str] | None:
    """The CLI arguments when `argv` runs laneway (`laneway ...`, `python -m laneway.cli`)."""
    if argv and posixpath.basename(argv[0]) == "laneway":
        return argv[1:]
    python = bool(argv) and posixpath.basename(argv[0]).startswith("python")
    if python and argv[1:3] == ["-m", "laneway.cli"]:
        return argv[3:]
    return None


def laneway_commands(command: str | list[Any] | None) -> list[list[str]]:
    if command is None:
        return []
    return [a for c in simple_commands(command) if (a := laneway_args(c)) is not None]


def strict_parser() -> argparse.ArgumentParser:
    """laneway's parser, refusing abbreviated flags (`--no-migrat`): argparse takes them,
    but a deployment file should spell its flags out."""
    parser = build_parser()
    parsers = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers += action.choices.values()
    for each in parsers:
        each.allow_abbrev = False
    return parser


def parse_laneway(args: list[str]) -> argparse.Namespace | str:
    """The arguments as `laneway` parses them, or argparse's complaint."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return strict_parser().parse_args(args)
    except SystemExit:
        lines = err.getvalue().strip().splitlines()
        return lines[-1] if lines else "prints its help and exits"


def parsed_commands(command: str | list[Any] | None) -> list[argparse.Namespace]:
    return [p for a in laneway_commands(command) if not isinstance(p := parse_laneway(a), str)]


def subcommands(command: str | list[Any] | None) -> set[str]:
    """The laneway subcommands a command runs, parsed or not (`api`, `worker`, ...)."""
    return {args[0] for args in laneway_commands(command) if args}


def split_models(value: str | None) -> list[str]:
    return [m.strip() for m in (value or "").split(",") if m.strip()]


def laneway_problems(args: list[str], where: str) -> list[str]:
    """A laneway command line: it parses, and names real capabilities, devices, models."""
    shown = f"`{shlex.join(['laneway', *args])}`"
    parsed = parse_laneway(args)
    if isinstance(parsed, str):
        return [f"{where}: {shown} does not parse: {parsed}"]
    problems = []
    if parsed.command in ("worker", "workers"):
        if parsed.capability not in CAPABILITIES:
            problems.append(
                f"{where}: {shown}: unknown capability {parsed.capability!r} "
                f"(known: {', '.join(CAPABILITIES)})"
            )
        if parsed.command == "workers" and not GPUS.fullmatch(parsed.gpus):
            problems.append(f"{where}: {shown}: --gpus takes all or indices, not {parsed.gpus!r}")
        for model in split_models(parsed.models):
            entry = catalog().entries.get(model)
            if entry is None:
                problems.append(f"{where}: {shown}: --models names {model!r}, no catalog id")
            elif entry.capability != parsed.capability:
                problems.append(
                    f"{where}: {shown}: --models names {model!r}, a model of "
                    f"{entry.capability!r}, not of {parsed.capability!r}"
                )
    device = getattr(parsed, "device", None)
    if device is not None and not DEVICE.fullmatch(device):
        problems.append(f"{where}: {shown}: --device takes auto, cpu or cuda:N, not {device!r}")
    return problems


def listening(parsed: argparse.Namespace, env: Mapping[str, str]) -> tuple[str, int] | None:
    """(host, port) a laneway command serves HTTP on, or None for one that serves none."""
    upper = {k.upper(): v for k, v in env.items()}
    if parsed.command in ("api", "up"):
        fields = Settings.model_fields
        host = parsed.host or upper.get("LANEWAY_HOST") or str(fields["host"].default)
        return host, int(parsed.port or upper.get("LANEWAY_PORT") or fields["port"].default)
    if parsed.command == "flower":
        return parsed.host, int(parsed.port)
    return None


@functools.cache
def setting_variables() -> frozenset[str]:
    """The variables Settings reads: LANEWAY_<field>, or the field's alias."""
    fields = Settings.model_fields.items()
    return frozenset((f.alias or f"LANEWAY_{name}").upper() for name, f in fields)


def readme_section(heading: str) -> str:
    """The README's text from `heading` to the next heading of level 1 or 2."""
    lines = README.read_text().splitlines()
    start = lines.index(heading)
    end = next(
        (i for i in range(start + 1, len(lines)) if re.match(r"#{1,2} ", lines[i])), len(lines)
    )
    return "\n".join(lines[start:end])


@functools.cache
def cli_variables() -> frozenset[str]:
    """LANEWAY_* variables README's Configuration table lists as read by the CLI, not by
    Settings (LANEWAY_LOG_LEVEL)."""
    return frozenset(
        name
        for line in readme_section("## Configuration").splitlines()
        if line.startswith("|") and "not a `Settings` field" in line
        for name in re.findall(r"`(LANEWAY_[A-Z0-9_]+)`", line.split("|")[1])
    )


def env_problems(env: Mapping[str, str], where: str) -> list[str]:
    """Every LANEWAY_* variable is a setting (or a CLI one the README lists), the values
    validate, and LANEWAY_MODELS names catalog ids. Other variables are not laneway's."""
    settings_vars = setting_variables()
    known = settings_vars | cli_variables()
    problems = [
        f"{where}: {name} is not a laneway setting (no Settings field, not in README's "
        "Configuration table)"
        for name in env
        if name.upper().startswith("LANEWAY_") and name.upper() not in known
    ]
    ours = {k: str(v) for k, v in env.items() if k.upper() in settings_vars}
    outside = {k: v for k, v in os.environ.items() if not k.upper().startswith("LANEWAY_")}
    with mock.patch.dict(os.environ, outside | ours, clear=True):
        try:
            settings = Settings()
        except ValidationError as exc:
            return [*problems, f"{where}: invalid laneway settings: {exc}"]
    if any(k.upper() == "LANEWAY_MODELS" for k in env):
        try:
            catalog().served(settings.models)
        except CatalogError as exc:
            problems.append(f"{where}: {exc}")
    return problems


# --- Dockerfiles ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    args: str


@dataclass(frozen=True)
class Dockerfile:
    name: str  # as messages show it: docker/Dockerfile.api
    steps: tuple[Instruction, ...]

    @classmethod
    def parse(cls, name: str, text: str) -> Dockerfile:
        """Instructions with their first line; continuations joined, comments dropped."""
        steps: list[Instruction] = []
        parts: list[str] = []
        start = 0
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue  # also inside a continuation, as Docker does
            if not parts:
                start = number
            parts.append(line.removesuffix("\\").strip())
            if not line.endswith("\\"):
                keyword, _, args = " ".join(parts).partition(" ")
                steps.append(Instruction(start, keyword.upper(), args.strip()))
                parts = []
        return cls(name, tuple(steps))

    @classmethod
    def load(cls, path: Path) -> Dockerfile:
        return cls.parse(path.relative_to(ROOT).as_posix(), path.read_text())

    def where(self, step: Instruction) -> str:
        return f"{self.name}:{step.line}"

    @property
    def final_stage(self) -> tuple[Instruction, ...]:
        starts = [i for i, s in enumerate(self.steps) if s.keyword == "FROM"]
        return self.steps[starts[-1] if starts else 0 :]

    def last(self, keyword: str) -> Instruction | None:
        return next((s for s in reversed(self.final_stage) if s.keyword == keyword), None)

    def command(self) -> list[str] | None:
        """What the image runs: ENTRYPOINT then CMD (exec or shell form)."""
        entry, cmd = self.last("ENTRYPOINT"), self.last("CMD")
        if entry is None and cmd is None:
            return None
        argv = exec_form(entry.args) if entry else []
        return argv + (exec_form(cmd.args) if cmd else [])

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for step in self.final_stage:
            if step.keyword == "ENV":
                env.update(env_pairs(step.args))
        return env

    def exposed(self) -> set[int]:
        return {
            int(word.split("/")[0])
            for step in self.final_stage
            if step.keyword == "EXPOSE"
            for word in step.args.split()
        }

    def installs(self, tool: str) -> bool:
        """Whether a RUN installs `tool` with the system package manager."""
        pattern = re.compile(rf"\b(apt-get|apt|apk|dnf|yum)\b.*\binstall\b.*\b{re.escape(tool)}\b")
        return any(s.keyword == "RUN" and pattern.search(s.args) for s in self.final_stage)


def exec_form(args: str) -> list[str]:
    """`["a", "b"]` (JSON) as it is; anything else runs under /bin/sh -c."""
    if args.startswith("["):
        with contextlib.suppress(json.JSONDecodeError):
            value = json.loads(args)
            if isinstance(value, list):
                return [str(v) for v in value]
    return ["/bin/sh", "-c", args]


def env_pairs(args: str) -> dict[str, str]:
    """`ENV A=1 B="x y"`, or the old `ENV A some value`."""
    words = shlex.split(args)
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return {k: v for k, _, v in (w.partition("=") for w in words)}


def copy_sources(args: str) -> list[str] | None:
    """The sources of a COPY/ADD (relative to the context), None when --from another stage."""
    words = exec_form(args) if args.startswith("[") else shlex.split(args)
    if any(w.startswith("--from") for w in words):
        return None
    paths = [w for w in words if not w.startswith("--")]
    return paths[:-1]


def glob_regex(pattern: str) -> str:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regular expression."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        else:
            out.append({"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i])))
            i += 1
    return "".join(out)


def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """(negated, pattern) per line of a .dockerignore; the last matching line decides."""
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = posixpath.normpath(line.removeprefix("!").strip().strip("/"))
        rules.append((negated, re.compile(glob_regex(pattern))))
    return rules


def ignored(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether the path (or a folder above it) is left out of the build context."""
    parts = posixpath.normpath(path).split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    verdict = False
    for negated, rule in rules:
        if any(rule.fullmatch(p) for p in prefixes):
            verdict = not negated
    return verdict


@functools.cache
def project_files() -> frozenset[str]:
    """What `pip install .` reads: pyproject.toml, its readme, the package folders."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    find = pyproject["tool"]["setuptools"]["packages"]["find"]
    packages = {p.rstrip("*").rstrip(".") for p in find["include"]}
    return frozenset({"pyproject.toml", pyproject["project"]["readme"], *packages})


def dockerfile_problems(df: Dockerfile, context: Path = ROOT) -> list[str]:
    """COPY/ADD sources exist and are not .dockerignored, `pip install .` comes after the
    project is copied, ENV sets real settings, the CMD parses, and serves on 0.0.0.0 on an
    EXPOSEd port."""
    ignore_file = context / ".dockerignore"
    rules = dockerignore_rules(ignore_file.read_text()) if ignore_file.exists() else []
    problems: list[str] = []
    copied: set[str] = set()
    for step in df.steps:
        where = df.where(step)
        if step.keyword in ("COPY", "ADD"):
            for source in copy_sources(step.args) or []:
                if re.match(r"[a-z]+://", source):
                    continue  # ADD from a URL
                relative = posixpath.normpath(source.lstrip("/"))
                if any(c in relative for c in "*?["):
                    found = bool(list(context.glob(relative)))
                else:
                    found = (context / relative).exists()
                if not found:
                    problems.append(
                        f"{where}: {step.keyword} {source}: no such path in the context"
                    )
                elif relative != "." and ignored(relative, rules):
                    problems.append(f"{where}: {step.keyword} {source}: excluded by .dockerignore")
                copied.add("." if relative == "." else relative.split("/")[0])
        elif step.keyword == "ENV":
            problems += env_problems(env_pairs(step.args), where)
        elif step.keyword == "RUN" and PIP_INSTALL_SELF.search(step.args) and "." not in copied:
            missing = sorted(project_files() - copied)
            if missing:
                problems.append(
                    f"{where}: `pip install .` runs before {', '.join(missing)} is copied"
                )
    command = df.command()
    cmd = df.last("CMD") or df.last("ENTRYPOINT")
    where = df.where(cmd) if cmd else df.name
    for args in laneway_commands(command):
        problems += laneway_problems(args, where)
    for parsed in parsed_commands(command):
        served = listening(parsed, df.env())
        if served is None:
            continue
        host, port = served
        if host not in ALL_INTERFACES:
            problems.append(f"{where}: `laneway {parsed.command}` listens on {host} only")
        if port not in df.exposed():
            problems.append(f"{where}: `laneway {parsed.command}` listens on {port}, not EXPOSEd")
    return problems


# --- compose -------------------------------------------------------------------------------


def build_spec(build: str | Mapping[str, Any]) -> tuple[str, str]:
    """(context, dockerfile) of a service's `build`."""
    if isinstance(build, str):
        return build, "Dockerfile"
    return str(build.get("context", ".")), str(build.get("dockerfile", "Dockerfile"))


def service_dockerfile(service: Mapping[str, Any]) -> Dockerfile | None:
    build = service.get("build")
    if build is None:
        return None
    context, name = build_spec(build)
    path = (ROOT / context / name).resolve()
    return Dockerfile.load(path) if path.is_file() else None


def service_command(service: Mapping[str, Any]) -> str | list[Any] | None:
    """The service's command, else its image's (for the images built here)."""
    if "command" in service:
        return service["command"]  # type: ignore[no-any-return]
    df = service_dockerfile(service)
    return df.command() if df else None


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return {k: v for k, _, v in (str(item).partition("=") for item in env)}
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def effective_env(service: Mapping[str, Any]) -> dict[str, str]:
    """The image's ENV overridden by the service's `environment`."""
    df = service_dockerfile(service)
    return (df.env() if df else {}) | environment(service)


def build_problems(services: Mapping[str, Any]) -> list[str]:
    problems = []
    for name, service in services.items():
        build = service.get("build")
        if build is None:
            continue
        context, dockerfile = build_spec(build)
        if not (ROOT / context).is_dir():
            problems.append(f"{name}: build context {context!r} is no folder")
        elif not (ROOT / context / dockerfile).is_file():
            problems.append(f"{name}: build.dockerfile {dockerfile!r} does not exist")
    return problems


def command_problems(services: Mapping[str, Any]) -> list[str]:
    return [
        problem
        for name, service in services.items()
        for args in laneway_commands(service_command(service))
        for problem in laneway_problems(args, name)
    ]


def compose_env_problems(config: Mapping[str, Any]) -> list[str]:
    """The x-* environment blocks (before merging) and every service's environment."""
    problems = [
        problem
        for key, block in config.items()
        if key.startswith("x-") and isinstance(block, dict)
        for problem in env_problems({str(k): str(v) for k, v in block.items()}, key)
    ]
    for name, service in (config.get("services") or {}).items():
        problems += env_problems(environment(service), name)
    return problems


def worker_problems(services: Mapping[str, Any]) -> list[str]:
    """Every capability the API serves has a worker in the default profile, and every
    worker has a model of its capability to serve."""
    problems = []
    covered: set[str] = set()
    for name, service in services.items():
        env = effective_env(service)
        for parsed in parsed_commands(service_command(service)):
            if parsed.command not in ("worker", "workers"):
                continue
            ids = split_models(parsed.models) or split_models(env.get("LANEWAY_MODELS"))
            ids = ids or DEFAULT_MODELS
            caps = {e.capability for i in ids if (e := catalog().entries.get(i))}
            if parsed.capability not in caps:
                problems.append(
                    f"{name}: `laneway {parsed.command} --capability {parsed.capability}` "
                    f"has no model of that capability among {', '.join(ids)}"
                )
            if not service.get("profiles"):
                covered.add(parsed.capability)
    for name, service in services.items():
        if "api" not in subcommands(service_command(service)):
            continue
        served = split_models(effective_env(service).get("LANEWAY_MODELS"))
        for entry in (catalog().entries[i] for i in served if i in catalog().entries):
            if entry.capability not in covered:
                problems.append(
                    f"{name}: serves {entry.id} ({entry.capability}) but no service of the "
                    f"default profile runs `laneway worker --capability {entry.capability}`"
                )
    return problems


@functools.cache
def api_routes(models: tuple[str, ...]) -> tuple[Any, ...]:
    from api.app import create_app

    return tuple(create_app(Settings(models=list(models), api_key="key")).routes)


def is_route(models: tuple[str, ...], path: str) -> bool:
    scope = {"type": "http", "path": path, "method": "GET", "root_path": "", "headers": []}
    return any(route.matches(scope)[0] == Match.FULL for route in api_routes(models))


def health_words(test: str | list[Any]) -> list[str] | None:
    """The words a healthcheck runs, None for NONE."""
    if isinstance(test, str):
        return shell_words(test)
    kind, rest = str(test[0]), [str(t) for t in test[1:]]
    if kind == "NONE":
        return None
    if kind == "CMD-SHELL":
        return shell_words(" ".join(rest))
    return rest


def healthcheck_problems(services: Mapping[str, Any]) -> list[str]:
    """The API has a health check; a check on the API hits a real, open GET route on its
    port from inside the container, with a tool the image has."""
    problems = []
    for name, service in services.items():
        env = effective_env(service)
        command = service_command(service)
        apis = [p for p in parsed_commands(command) if p.command == "api"]
        check = service.get("healthcheck") or {}
        words = health_words(check["test"]) if "test" in check else None
        if check.get("disable") or words is None:
            if "api" in subcommands(command):
                problems.append(f"{name}: runs `laneway api` but has no healthcheck")
            continue
        tool = posixpath.basename(words[0]) if words else ""
        df = service_dockerfile(service)
        if df is not None and tool in HTTP_FETCHERS and not df.installs(tool):
            problems.append(
                f"{name}: healthcheck runs {tool}, which {df.name} does not install "
                "(slim images have neither curl nor wget: use python -c with urllib)"
            )
        if not apis:
            continue
        served = listening(apis[0], env)
        assert served is not None
        models = tuple(split_models(env.get("LANEWAY_MODELS"))) or ("laneway/fake-embeddings",)
        urls = list(URL.finditer(" ".join(words)))
        if not urls:
            problems.append(f"{name}: healthcheck {check['test']!r} requests no URL of the API")
        for url in urls:
            host, path = url["host"].strip("[]"), url["path"] or "/"
            if host not in LOOPBACK:
                problems.append(f"{name}: healthcheck asks {host}, not the container itself")
            if int(url["port"] or 80) != served[1]:
                problems.append(
                    f"{name}: healthcheck asks port {url['port'] or 80}, the API listens on "
                    f"{served[1]}"
                )
            if not is_route(models, path):
                problems.append(f"{name}: healthcheck asks GET {path}, no route of the API")
            elif path.startswith("/v1"):
                problems.append(f"{name}: healthcheck asks {path}, which needs the API key")
    return problems


def port_problems(services: Mapping[str, Any]) -> list[str]:
    """A published port is the port the service's command listens on, on all interfaces."""
    problems = []
    for name, service in services.items():
        env = effective_env(service)
        serving = [s for p in parsed_commands(service_command(service)) if (s := listening(p, env))]
        if not serving:
            continue
        for host, _ in serving:
            if host not in ALL_INTERFACES and service.get("ports"):
                problems.append(f"{name}: listens on {host}, out of reach of its published ports")
        for published in service.get("ports") or []:
            _, target = host_ip_and_target(published)
            if target not in {str(port) for _, port in serving}:
                problems.append(
                    f"{name}: publishes {published!r}, but its command listens on "
                    f"{', '.join(str(port) for _, port in serving)}"
                )
    return problems


def dependency_problems(services: Mapping[str, Any]) -> list[str]:
    """`service_healthy` needs a health check, and no worker may wait for a healthy API:
    /health answers 200 only once every served model has a warm worker."""
    problems = []
    apis = {name for name, s in services.items() if "api" in subcommands(service_command(s))}
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        if isinstance(depends, list):
            continue  # service_started
        runs_worker = bool({"worker", "workers"} & subcommands(service_command(service)))
        for dependency, spec in depends.items():
            condition = (spec or {}).get("condition", "service_started")
            if condition != "service_healthy":
                continue
            if "healthcheck" not in (services.get(dependency) or {}):
                problems.append(f"{name}: waits for {dependency} to be healthy; it has no check")
            if runs_worker and dependency in apis:
                problems.append(
                    f"{name}: waits for {dependency} to be healthy, which it never is before "
                    "a worker is warm"
                )
    return problems
