"""The shape: a capability lives in its own modules, and generic code names none.

A capability's own modules are named after it (``api/{protocol,serving,routes}/<cap>.py``,
``tasks/contracts/<cap>*.py``, ``workers/<cap>*.py``, ``workers/backends/<cap>*.py``) and
it has one registry entry (``configs/capabilities.py``) and catalog entries. Every other
module of the server is generic: it reaches capabilities through the registry and their
contract hooks, so it neither imports a capability's module nor spells a capability's name
in its code (docstrings and comments may explain). Adding a capability then shows in its
diff as its own files, its registry entry and its catalog entries only.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from configs.capabilities import CAPABILITIES

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("api", "tasks", "workers", "configs", "laneway")
# generic modules that may name capabilities, and why
ALLOWED = {
    # the one settings object holds every capability's environment variables
    "configs/settings.py",
    # the registry itself
    "configs/capabilities.py",
    # the fake backends every capability's fast tests use
    "workers/backends/fake.py",
    # the backend of sequence-classification models, shared by rerank and classify
    "workers/backends/sequence_classification.py",
}
# what names a capability: its name, or its singular ("embedding"), as a word's start
SPELLINGS = {cap: re.compile(rf"(?<![A-Za-z]){re.escape(cap.rstrip('s'))}") for cap in CAPABILITIES}


def owner(path: Path) -> str | None:
    """The capability a module belongs to by its name, or None for a generic module."""
    for cap in CAPABILITIES:
        if path.stem == cap or path.stem.startswith(f"{cap}_"):
            return cap
    return None


def generic_modules() -> list[Path]:
    return [
        path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if owner(path) is None and str(path.relative_to(ROOT)) not in ALLOWED
    ]


def docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def named_capabilities(path: Path) -> list[str]:
    """What in ``path``'s code names a capability: imports of its modules, and string
    constants (not docstrings) that spell it."""
    tree = ast.parse(path.read_text(), str(path))
    skip = docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [f"{node.module}.{a.name}" for a in node.names]
            )
            for module in modules:
                parts = module.split(".")
                if parts[0] in PACKAGES and any(owner(Path(p)) for p in parts[1:]):
                    found.append(f"line {node.lineno}: imports {module}")
        elif (
            isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
        ):
            for cap, spelling in SPELLINGS.items():
                if spelling.search(node.value):
                    found.append(f"line {node.lineno}: {node.value[:60]!r} names {cap}")
    return found


def test_the_probe_sees_what_it_looks_for(tmp_path: Path) -> None:
    cap = CAPABILITIES[0]
    bad = tmp_path / "generic.py"
    bad.write_text(f'"""About {cap}."""\nimport tasks.contracts.{cap}\nX = "/v1/{cap}"\n')
    found = named_capabilities(bad)
    assert len(found) == 2, found  # the import and the string, not the docstring


@pytest.mark.parametrize("path", generic_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_generic_modules_name_no_capability(path: Path) -> None:
    assert named_capabilities(path) == []
