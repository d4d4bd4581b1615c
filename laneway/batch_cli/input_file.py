"""The batch input file, checked before anything is uploaded, and the names its results
are downloaded to."""

from __future__ import annotations

import json
from pathlib import Path

from tasks.store.safety import NESTED_TOO_DEEPLY, JSONTooDeep, parse_json

MAX_PROBLEMS = 5


def _line_problem(raw: bytes, endpoint: str, seen: set[str]) -> str | None:
    """What is wrong with one non-blank line of a batch input file (None: nothing)."""
    try:  # the server's parser (tasks/batches/validation.py), so the two agree
        obj, _ = parse_json(raw)
    except UnicodeDecodeError:
        return "not valid UTF-8"
    except JSONTooDeep:
        return f"not valid JSON: {NESTED_TOO_DEEPLY}"
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc.msg} at column {exc.colno})"
    if not isinstance(obj, dict):
        kind = "an array" if isinstance(obj, list) else f"a {type(obj).__name__}"
        return f"must be a JSON object, this is {kind}"
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return "'custom_id' is missing" if custom_id is None else "'custom_id' must be a string"
    if custom_id in seen:
        return f"custom_id {custom_id!r} is used more than once"
    seen.add(custom_id)
    if obj.get("method") != "POST":
        return f"'method' is {obj.get('method')!r}, must be 'POST'"
    if obj.get("url") != endpoint:
        return f"'url' is {obj.get('url')!r}, must be the --endpoint {endpoint!r}"
    if not isinstance(obj.get("body"), dict):
        return "'body' must be a JSON object"
    return None


def check_jsonl(
    path: Path, endpoint: str, max_problems: int = MAX_PROBLEMS
) -> tuple[int, list[str]]:
    """Read ``path`` line by line: (requests, problems as ``line N: what``), stopping after
    ``max_problems``. Blank lines are allowed, as the server allows them."""
    problems: list[str] = []
    seen: set[str] = set()
    count = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            count += 1
            problem = _line_problem(raw, endpoint, seen)
            if problem is not None:
                problems.append(f"line {lineno}: {problem}")
                if len(problems) >= max_problems:
                    problems.append(f"(stopped after {max_problems} problems)")
                    break
    if count == 0 and not problems:
        problems.append("the file has no requests")
    return count, problems


def output_paths(input_path: Path) -> tuple[Path, Path]:
    """``in.jsonl`` -> ``in.output.jsonl``, ``in.errors.jsonl``; another name keeps its
    suffix: ``in.txt`` -> ``in.txt.output.jsonl``."""
    name = input_path.name
    stem = name[: -len(".jsonl")] if name.endswith(".jsonl") and name != ".jsonl" else name
    return (
        input_path.with_name(f"{stem}.output.jsonl"),
        input_path.with_name(f"{stem}.errors.jsonl"),
    )
