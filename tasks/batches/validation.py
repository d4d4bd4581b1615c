"""Input validation: check every line of a batch's input file as OpenAI does, and cut a
valid file into chunks at line boundaries (``LANEWAY_CHUNK_LINES`` requests each)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import xxhash

from configs.catalog import Catalog
from configs.settings import Settings
from tasks.batches.endpoints import BATCH_ENDPOINTS
from tasks.errors import quote
from tasks.filestore import COPY_CHUNK, FileStore
from tasks.store.safety import NESTED_TOO_DEEPLY, JSONTooDeep, parse_json

log = logging.getLogger(__name__)

MAX_ERRORS_REPORTED = 1000


@dataclass
class ChunkSpec:
    line_start: int  # request index (0-based) of the first request
    byte_start: int
    byte_end: int


@dataclass
class Validation:
    errors: list[dict[str, Any]] = field(default_factory=list)
    chunks: list[ChunkSpec] = field(default_factory=list)
    model: str | None = None
    total: int = 0

    def error(self, code: str, line: int | None, message: str, param: str | None = None) -> None:
        if len(self.errors) < MAX_ERRORS_REPORTED:
            self.errors.append({"code": code, "line": line, "message": message, "param": param})


def validate_input(
    *,
    settings: Settings,
    catalog: Catalog,
    store: FileStore,
    storage_key: str,
    size: int,
    endpoint: str,
) -> Validation:
    """Check every line as OpenAI does, and cut the valid file into chunks."""
    v = Validation()
    if size > settings.max_batch_input_bytes:
        v.error(
            "file_too_large",
            None,
            f"batch input files may be at most {settings.max_batch_input_bytes} bytes",
        )
        return v
    capability = BATCH_ENDPOINTS[endpoint]
    limit = settings.max_batch_line_bytes
    seen: set[bytes] = set()  # digests of the custom_ids so far: memory bounded by lines
    offset = chunk_byte = 0
    chunk_first = 0
    with store.open(storage_key) as f:
        for lineno, (raw, size) in enumerate(bounded_lines(f, limit), start=1):
            offset += size
            if raw is not None and not raw.strip():
                continue
            if v.total >= settings.max_batch_lines:
                v.error(
                    "too_many_requests",
                    lineno,
                    f"a batch may have at most {settings.max_batch_lines} requests",
                )
                break
            v.total += 1
            if raw is None:
                message = f"the line is {size} bytes long; a line may be at most {limit} bytes"
                v.error("line_too_large", lineno, message)
            else:
                _check_line(v, raw, lineno, seen, endpoint, capability, settings, catalog)
            if v.total - chunk_first == settings.chunk_lines:
                v.chunks.append(ChunkSpec(chunk_first, chunk_byte, offset))
                chunk_first, chunk_byte = v.total, offset
            if len(v.errors) >= MAX_ERRORS_REPORTED:
                break
    if v.total > chunk_first:
        v.chunks.append(ChunkSpec(chunk_first, chunk_byte, offset))
    if v.total == 0 and not v.errors:
        v.error("empty_file", None, "the input file has no requests")
    return v


def bounded_lines(f: BinaryIO, limit: int) -> Iterator[tuple[bytes | None, int]]:
    """Each line of ``f`` and its size in bytes, with None in place of a line longer than
    ``limit`` bytes (its newline not counted): such a line is read past in pieces, never
    held whole."""
    while raw := f.readline(limit + 1):
        if len(raw) <= limit or raw.endswith(b"\n"):
            yield raw, len(raw)
            continue
        size = len(raw)
        while not raw.endswith(b"\n") and (raw := f.readline(COPY_CHUNK)):
            size += len(raw)
        yield None, size


# (code, message, param) of a line's first problem
Problem = tuple[str, str, str | None]


def _check_line(
    v: Validation,
    raw: bytes,
    lineno: int,
    seen: set[bytes],
    endpoint: str,
    capability: str,
    settings: Settings,
    catalog: Catalog,
) -> None:
    """Record the line's first problem in ``v`` (none: it is a valid request). A check
    that breaks on the line (a bug, or input nobody foresaw) makes it an error line,
    never a validation that crashes on every retry."""
    try:
        obj, problem = _parse(raw)
        if problem is None:
            problem = _check_envelope(obj, seen, endpoint)
        if problem is None:
            problem = _check_model(v, obj["body"], lineno, endpoint, capability, settings, catalog)
    except Exception:
        log.exception("line %d could not be checked", lineno)
        problem = ("invalid_request", "the line could not be checked", None)
    if problem is not None:
        code, message, param = problem
        v.error(code, lineno, message, param)


def _parse(raw: bytes) -> tuple[dict[str, Any], Problem | None]:
    try:
        obj, _ = parse_json(raw)
    except UnicodeDecodeError:
        return {}, ("invalid_file_encoding", "the line is not valid UTF-8", None)
    except JSONTooDeep:
        return {}, ("invalid_json_line", f"the line is not valid JSON: {NESTED_TOO_DEEPLY}", None)
    except ValueError:
        return {}, ("invalid_json_line", "the line is not valid JSON", None)
    if not isinstance(obj, dict):
        return {}, ("invalid_json_line", "each line must be a JSON object", None)
    return obj, None


def _check_envelope(obj: dict[str, Any], seen: set[bytes], endpoint: str) -> Problem | None:
    """custom_id (present, unique), method, url and a body object."""
    for key in ("custom_id", "method", "url", "body"):
        if key not in obj:
            return ("missing_required_parameter", f"missing '{key}'", key)
    custom_id = obj["custom_id"]
    if not isinstance(custom_id, str) or not custom_id:
        return ("invalid_custom_id", "'custom_id' must be a non-empty string", "custom_id")
    digest = xxhash.xxh3_128_digest(custom_id.encode("utf-8", "surrogatepass"))
    if digest in seen:
        message = f"the custom_id {quote(custom_id)} is used more than once in this file"
        return ("duplicate_custom_id", message, "custom_id")
    seen.add(digest)
    if obj["method"] != "POST":
        return ("invalid_method", "'method' must be 'POST'", "method")
    if obj["url"] != endpoint:
        message = f"'url' is {quote(obj['url'])}; this batch's endpoint is {endpoint!r}"
        return ("invalid_url", message, "url")
    if not isinstance(obj["body"], dict):
        return ("invalid_body", "'body' must be a JSON object", "body")
    return None


def _check_model(
    v: Validation,
    body: dict[str, Any],
    lineno: int,
    endpoint: str,
    capability: str,
    settings: Settings,
    catalog: Catalog,
) -> Problem | None:
    """A served model of the endpoint's capability, the same on every line."""
    model = body.get("model")
    if not isinstance(model, str):
        return ("missing_required_parameter", "'body.model' is required", "body.model")
    entry = catalog.find(model)  # by id or alias; the batch records the id
    if entry is None or entry.id not in settings.models or entry.capability != capability:
        message = f"the model {quote(model)} is not served for {endpoint}"
        return ("model_not_found", message, "body.model")
    if v.model is None:
        v.model = entry.id
    elif entry.id != v.model:
        message = (
            f"all requests in a batch must use one model; line {lineno} uses {quote(model)}, "
            f"earlier lines {v.model!r}"
        )
        return ("mismatched_model", message, "body.model")
    return None
