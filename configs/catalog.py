"""The model catalog: which models exist, how to load them, and their limits.

The packaged catalog (``configs/models.yaml``) is merged with an optional user catalog
(``LANEWAY_MODEL_CONFIG``); entries of the user catalog replace packaged ones by id.
An entry may list ``aliases``, other names clients may send as ``model`` (``whisper-1``
for the default speech model, so code written for OpenAI runs unchanged); an alias in
the user catalog takes the name from a packaged entry.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from configs.capabilities import CAPABILITIES, REGISTRY

PACKAGED_CATALOG = Path(__file__).with_name("models.yaml")
__all__ = ["CAPABILITIES", "Catalog", "CatalogEntry", "CatalogError", "load_catalog"]


class CatalogError(ValueError):
    """The catalog or the served-model list is wrong; the message says how."""


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
    dimensions: int | None = None
    matryoshka_dims: tuple[int, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    # the whole ``defaults`` mapping as given (capability-specific keys, e.g. chat's)
    options: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    @property
    def supports_dimensions(self) -> bool:
        return bool(self.matryoshka_dims)

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
    known = {"id", "capability", "backend", "source", "defaults", "memory_mb", "aliases"}
    aliases = raw.get("aliases") or []
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
        raise CatalogError(f"{origin}: model {model_id!r}: aliases must be a list of names")
    return CatalogEntry(
        id=model_id,
        capability=capability,
        backend=backend,
        source={str(k): str(v) for k, v in source.items()},
        max_input_tokens=int(defaults.get("max_input_tokens", 512)),
        batch_token_budget=int(defaults.get("batch_token_budget", 16384)),
        dtype=str(defaults.get("dtype", "float32")),
        memory_mb=int(raw.get("memory_mb", 0)),
        dimensions=int(defaults["dimensions"]) if defaults.get("dimensions") else None,
        matryoshka_dims=tuple(int(d) for d in defaults.get("matryoshka_dims", []) or []),
        extra={k: v for k, v in raw.items() if k not in known},
        options=dict(defaults),
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
