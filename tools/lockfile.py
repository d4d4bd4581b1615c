"""requirements.lock: what ./dev installs into .venv (the project's dependencies and its
`dev` extra), every package pinned with its sha256 hashes, for Linux x86_64 and CPython
3.11. `./dev lock` writes it with pip-compile (pip-tools), through pip's own resolver and
configuration, so torch is the CPU wheel `torch==2.13.0` resolves to (`2.13.0+cpu`).

The lock records a sha256 of pyproject.toml's dependency spec (requires-python, the
dependencies and the dev extra, whitespace and order ignored, comments dropped by the TOML
parser). `check` recomputes it and checks that each of those requirements is pinned, at a
version it admits: offline, standard library only (plus `packaging` for the version check
where it imports), well under a second. It does not look for newer releases (that is
`./dev lock --upgrade`).

Re-lock after changing those sections: `./dev lock` (keeps the other pins), `./dev lock -P
NAME` (moves one), `./dev lock --upgrade` (moves all); then commit pyproject.toml and the
lock together. Where pip has no local torch 2.13.0+cpu wheel, it is on PyTorch's CPU index
(PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu), for locking and installing.

    python3 tools/lockfile.py check    # exit 1 with the reasons when the lock is stale
    python3 tools/lockfile.py stamp    # record the spec hash in the lock (./dev lock does)
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
LOCK = ROOT / "requirements.lock"
EXTRA = "dev"
HASH_LINE = "# pyproject-sha256: "
HASH_NOTE = " (requires-python, dependencies and the dev extra; ./dev lock --check)"
_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def canonical(name: str) -> str:
    """PEP 503 name: lower case, runs of - _ . as one -."""
    return re.sub(r"[-_.]+", "-", name).lower()


def dependency_spec(pyproject: Path = PYPROJECT) -> dict[str, Any]:
    """The part of pyproject.toml that the lock is resolved from."""
    project = tomllib.loads(pyproject.read_text())["project"]
    extras = project.get("optional-dependencies", {})

    def norm(reqs: list[str]) -> list[str]:
        # no whitespace in name, extras and versions; single spaces in a marker
        out = []
        for req in reqs:
            head, semi, marker = req.partition(";")
            out.append("".join(head.split()) + (f"; {' '.join(marker.split())}" if semi else ""))
        return sorted(out)

    return {
        "requires-python": project.get("requires-python", ""),
        "dependencies": norm(project.get("dependencies", [])),
        EXTRA: norm(extras.get(EXTRA, [])),
    }


def spec_hash(pyproject: Path = PYPROJECT) -> str:
    text = json.dumps(dependency_spec(pyproject), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def recorded_hash(lock_text: str) -> str | None:
    for line in lock_text.splitlines():
        if line.startswith(HASH_LINE):
            return line[len(HASH_LINE) :].split()[0]
    return None


def pins(lock_text: str) -> dict[str, str]:
    """{canonical name: version} of the lock's `name==version` lines."""
    return {
        canonical(m.group(1)): m.group(2)
        for line in lock_text.splitlines()
        if (m := _PIN.match(line))
    }


def pin_problem(requirement: str, pinned: dict[str, str]) -> str | None:
    """Why `requirement` is not satisfied by the lock's pins, or None."""
    try:
        from packaging.requirements import Requirement
        from packaging.version import Version
    except ImportError:  # the system python3 of `./dev lock --check`: names only
        name = _NAME.match(requirement)
        if name is None:
            return f"cannot parse requirement {requirement!r}"
        return None if canonical(name.group(1)) in pinned else f"{requirement!r} is not pinned"
    req = Requirement(requirement)
    if req.marker is not None and not req.marker.evaluate({"extra": EXTRA}):
        return None  # not for this platform or Python
    version = pinned.get(canonical(req.name))
    if version is None:
        return f"{requirement!r} is not pinned"
    if not req.specifier.contains(Version(version), prereleases=True):
        return f"{requirement!r} is pinned at {version}, outside its range"
    return None  # an extra's packages (celery[redis]) are pinned under their own names


def problems(pyproject: Path = PYPROJECT, lock: Path = LOCK) -> list[str]:
    """Why the lock does not match pyproject.toml; [] when it does."""
    name = lock.name
    if not lock.is_file():
        return [f"{name} is missing: run ./dev lock"]
    text = lock.read_text()
    found: list[str] = []
    recorded, want = recorded_hash(text), spec_hash(pyproject)
    if recorded is None:
        found.append(f"{name} records no pyproject hash ({HASH_LINE.strip()} ...): run ./dev lock")
    elif recorded != want:
        found.append(
            f"{name} was locked from another dependency spec than pyproject.toml's "
            f"(recorded {recorded[:12]}, now {want[:12]}): run ./dev lock"
        )
    for line in text.splitlines():
        if line.startswith("-") or "file://" in line:
            found.append(f"{name}: machine-specific option or path {line.strip()!r}")
    pinned = pins(text)
    if not pinned:
        found.append(f"{name} pins nothing")
    spec = dependency_spec(pyproject)
    for requirement in spec["dependencies"] + spec[EXTRA]:
        if (problem := pin_problem(requirement, pinned)) is not None:
            found.append(f"{name}: {problem}: run ./dev lock")
    return found


def stamp(pyproject: Path = PYPROJECT, lock: Path = LOCK) -> None:
    """Write (or replace) the hash line, after pip-compile's header comment."""
    lines = [ln for ln in lock.read_text().splitlines() if not ln.startswith(HASH_LINE)]
    at = next((i for i, ln in enumerate(lines) if not ln.startswith("#")), len(lines))
    lines.insert(at, HASH_LINE + spec_hash(pyproject) + HASH_NOTE)
    lock.write_text("\n".join(lines) + "\n")


def main(argv: list[str]) -> int:
    if argv == ["check"]:
        found = problems()
        for problem in found:
            print(f"lock: {problem}", file=sys.stderr)
        if not found:
            print(f"lock: {LOCK.name} matches pyproject.toml ({len(pins(LOCK.read_text()))} pins)")
        return 1 if found else 0
    if argv == ["stamp"]:
        stamp()
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
