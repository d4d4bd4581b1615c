"""The model catalog: which models exist, how to load them, and their limits.

The packaged catalog (``configs/models.yaml``) is merged with an optional user catalog
(``LANEWAY_MODEL_CONFIG``); entries of the user catalog replace packaged ones by id.
An entry may list ``aliases``, other names clients may send as ``model`` (``whisper-1``
for the default speech model, so code written for OpenAI runs unchanged); an alias in
the user catalog takes the name from a packaged entry.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, cast

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic_core import ErrorDetails

from configs.capabilities import CAPABILITIES, REGISTRY

PACKAGED_CATALOG = Path(__file__).with_name("models.yaml")
__all__ = [
    "CAPABILITIES",
    "COMMON_DEFAULTS",
    "Catalog",
    "CatalogEntry",
    "CatalogError",
    "CatalogOptions",
    "load_catalog",
]
# the keys of an entry's ``defaults:`` every capability has (CatalogEntry's own fields);
# the others are the capability's options (its contract's ``OPTIONS``)
COMMON_DEFAULTS: tuple[str, ...] = ("max_input_tokens", "batch_token_budget", "dtype")


class CatalogError(ValueError):
    """The catalog or the served-model list is wrong; the message says how."""


class CatalogOptions(BaseModel):
    """A capability's catalog options: the keys of an entry's ``defaults:`` beyond
    ``COMMON_DEFAULTS``, backend knobs included. Each capability's contract module declares
    a subclass as ``OPTIONS``; the catalog validates every entry with it when it loads
    (an unknown key is an error) and keeps the instance as ``CatalogEntry.options``. A key
    set to null takes its default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, Mapping):  # an unknown key stays, to be refused
            return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}
        return data

    @classmethod
    def of(cls, entry: CatalogEntry) -> Self:
        """``entry``'s options, typed: raises TypeError when they are another class's
        (an entry of another capability)."""
        options = entry.options
        if not isinstance(options, cls):
            raise TypeError(
                f"model {entry.id!r} ({entry.capability}) has {type(options).__name__}, "
                f"not {cls.__name__}"
            )
        return options

    def public(self) -> dict[str, Any]:
        """The fields ``/v1/models`` shows for the model, beside the common ones."""
        return {}


def options_class(capability: str) -> type[CatalogOptions]:
    """The capability's ``OPTIONS`` (its contract module, imported here on first use: the
    contract imports this module, never the other way round at import time)."""
    if capability not in REGISTRY:
        raise CatalogError(f"unknown capability {capability!r}; known: {', '.join(CAPABILITIES)}")
    return cast(type[CatalogOptions], REGISTRY[capability].contract_module().OPTIONS)


def _options_error(model_id: str, kind: type[CatalogOptions], error: ErrorDetails) -> str:
    """One pydantic error as a sentence naming the entry and the key."""
    key = ".".join(str(part) for part in error["loc"])
    where = f"model {model_id!r}: defaults.{key}" if key else f"model {model_id!r}: defaults:"
    if error["type"] == "extra_forbidden":
        known = ", ".join([*COMMON_DEFAULTS, *kind.model_fields])
        return f"{where} is not a known option; known: {known}"
    if error["type"] == "value_error":  # a validator's own sentence
        reason = str((error.get("ctx") or {}).get("error", error["msg"]))
        return f"{where} {reason}; got {error['input']!r}" if key else f"{where} {reason}"
    return f"{where}: {error['msg']}; got {error['input']!r}"


def validate_options(model_id: str, capability: str, defaults: Mapping[str, Any]) -> CatalogOptions:
    """An entry's ``defaults:`` (``COMMON_DEFAULTS`` left out) as its capability's options;
    CatalogError naming the entry and the key when one is wrong or unknown."""
    kind = options_class(capability)
    given = {k: v for k, v in defaults.items() if k not in COMMON_DEFAULTS}
    try:
        return kind.model_validate(given)
    except ValidationError as exc:
        raise CatalogError(
            "; ".join(_options_error(model_id, kind, e) for e in exc.errors())
        ) from None


@dataclass(frozen=True)
class CatalogEntry:
    id: str
    capability: str
    backend: str
    source: dict[str, str]
    max_input_tokens: int
    batch_token_budget: int
    dtype: str = "float32"
    memory_mb: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    # the capability's options (``CatalogOptions``), read typed with ``<Options>.of(entry)``;
    # a mapping given here (code and tests that build entries) is validated into them
    options: CatalogOptions = field(default_factory=CatalogOptions)
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        kind = options_class(self.capability)
        given: object = self.options
        if isinstance(given, kind):
            return
        if type(given) is CatalogOptions:  # the default: none given
            given = {}
        if not isinstance(given, Mapping):
            raise CatalogError(
                f"model {self.id!r}: options are {type(given).__name__}, not {kind.__name__}"
            )
        object.__setattr__(self, "options", validate_options(self.id, self.capability, given))

    def resolve_path(self, *, auto_download: bool) -> str:
        """Where the weights are: a local directory, a packaged directory or a hub id."""
        if "path" in self.source:
            path = Path(self.source["path"]).expanduser()
            if not path.is_dir():
                raise CatalogError(f"model {self.id!r}: local directory {path} does not exist")
            return str(path)
        if "package" in self.source:
            module_name = self.source["package"]
            try:
                module = importlib.import_module(module_name)
            except ImportError as exc:
                raise CatalogError(
                    f"model {self.id!r} is packaged in {module_name!r}, which is not installed"
                ) from exc
            sub = self.source.get("subdir", "model")
            return str(Path(module.__file__ or "").parent / sub)
        if "hub" in self.source:
            if not auto_download:
                raise CatalogError(
                    f"model {self.id!r} comes from the hub ({self.source['hub']}); "
                    "set LANEWAY_AUTO_DOWNLOAD=true or point a catalog entry at a local directory"
                )
            return self.source["hub"]
        raise CatalogError(f"model {self.id!r}: source needs one of path, package, hub")


class Catalog:
    def __init__(self, entries: dict[str, CatalogEntry]) -> None:
        self.entries = entries
        # alias -> id; entries later in ``entries`` (the user catalog's) win a name
        self.aliases: dict[str, str] = {}
        for entry in entries.values():
            for alias in entry.aliases:
                if alias in entries:
                    raise CatalogError(f"model {entry.id!r}: alias {alias!r} is a model id")
                self.aliases[alias] = entry.id

    def find(self, name: str) -> CatalogEntry | None:
        """The entry a client's ``model`` names, by id or alias; None when none does."""
        entry = self.entries.get(name)
        if entry is None and name in self.aliases:
            entry = self.entries[self.aliases[name]]
        return entry

    def get(self, model_id: str) -> CatalogEntry:
        entry = self.find(model_id)
        if entry is None:
            raise CatalogError(
                f"unknown model {model_id!r}; catalog ids: {', '.join(sorted(self.entries))}"
            )
        return entry

    def names(self, served: list[str]) -> list[str]:
        """Every name the served models answer to: their ids, then their aliases."""
        ids = set(served)
        return list(served) + [a for a, mid in self.aliases.items() if mid in ids]

    def served(self, model_ids: list[str]) -> list[CatalogEntry]:
        """The entries for LANEWAY_MODELS, failing fast on any unknown id."""
        aliased = [m for m in model_ids if m not in self.entries and m in self.aliases]
        if aliased:
            raise CatalogError(
                "LANEWAY_MODELS names catalog ids, not aliases: "
                + ", ".join(f"{a} (an alias of {self.aliases[a]})" for a in aliased)
            )
        unknown = [m for m in model_ids if m not in self.entries]
        if unknown:
            raise CatalogError(
                f"LANEWAY_MODELS names unknown model(s) {', '.join(unknown)}; "
                f"catalog ids: {', '.join(sorted(self.entries))}"
            )
        return [self.entries[m] for m in model_ids]


def _entry(raw: dict[str, Any], origin: Path) -> CatalogEntry:
    try:
        model_id = str(raw["id"])
        capability = str(raw["capability"])
        source = raw["source"]
    except KeyError as exc:
        raise CatalogError(f"{origin}: catalog entry {raw!r} lacks {exc.args[0]!r}") from None
    if capability not in REGISTRY:
        raise CatalogError(
            f"{origin}: model {model_id!r} has capability {capability!r}; "
            f"known: {', '.join(CAPABILITIES)}"
        )
    # an entry may leave the backend out: its capability's default
    backend = str(raw.get("backend") or REGISTRY[capability].default_backend)
    if isinstance(source, str):
        source = {"path": source} if source.startswith(("/", ".", "~")) else {"hub": source}
    if not isinstance(source, dict):
        raise CatalogError(f"{origin}: model {model_id!r}: source must be a mapping or a string")
    if "path" in source and not Path(source["path"]).is_absolute():
        source = {**source, "path": str((origin.parent / source["path"]).resolve())}
    defaults = raw.get("defaults", {}) or {}
    if not isinstance(defaults, dict):
        raise CatalogError(f"{origin}: model {model_id!r}: defaults must be a mapping")
    known = {"id", "capability", "backend", "source", "defaults", "memory_mb", "aliases"}
    aliases = raw.get("aliases") or []
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
        raise CatalogError(f"{origin}: model {model_id!r}: aliases must be a list of names")
    try:
        options = validate_options(model_id, capability, defaults)
    except CatalogError as exc:
        raise CatalogError(f"{origin}: {exc}") from None
    return CatalogEntry(
        id=model_id,
        capability=capability,
        backend=backend,
        source={str(k): str(v) for k, v in source.items()},
        max_input_tokens=int(defaults.get("max_input_tokens", 512)),
        batch_token_budget=int(defaults.get("batch_token_budget", 16384)),
        dtype=str(defaults.get("dtype", "float32")),
        memory_mb=int(raw.get("memory_mb", 0)),
        extra={k: v for k, v in raw.items() if k not in known},
        options=options,
        aliases=tuple(aliases),
    )


def _read(path: Path) -> dict[str, CatalogEntry]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise CatalogError(f"cannot read model catalog {path}: {exc}") from exc
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list):
        raise CatalogError(f"{path}: expected a top-level 'models:' list")
    return {e.id: e for e in (_entry(raw, path) for raw in models)}


def load_catalog(user_catalog: Path | None = None) -> Catalog:
    entries = _read(PACKAGED_CATALOG)
    if user_catalog is not None:
        for model_id, entry in _read(Path(user_catalog)).items():
            entries.pop(model_id, None)  # a replaced entry moves last: its aliases win
            entries[model_id] = entry
    return Catalog(entries)
