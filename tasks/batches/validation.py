"""Input validation: check every line of a batch's input file as OpenAI does, and cut a
valid file into chunks at line boundaries (``LANEWAY_CHUNK_LINES`` requests each)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import xxhash

from configs.catalog import Catalog, CatalogError
from configs.settings import Settings
from tasks.batches.endpoints import BATCH_ENDPOINTS
from tasks.errors import quote
from tasks.filestore import FileStore

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
    seen: set[bytes] = set()  # digests of the custom_ids so far: memory bounded by lines
    offset = chunk_byte = 0
    chunk_first = 0
    with store.open(storage_key) as f:
        for lineno, raw in enumerate(f, start=1):
            offset += len(raw)
            if not raw.strip():
                continue
            if v.total >= settings.max_batch_lines:
                v.error(
                    "too_many_requests",
                    lineno,
                    f"a batch may have at most {settings.max_batch_lines} requests",
                )
                break
            v.total += 1
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
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        v.error("invalid_file_encoding", lineno, "the line is not valid UTF-8")
        return
    except ValueError:
        v.error("invalid_json_line", lineno, "the line is not valid JSON")
        return
    if not isinstance(obj, dict):
        v.error("invalid_json_line", lineno, "each line must be a JSON object")
        return
    for key in ("custom_id", "method", "url", "body"):
        if key not in obj:
            v.error("missing_required_parameter", lineno, f"missing '{key}'", key)
            return
    custom_id = obj["custom_id"]
    if not isinstance(custom_id, str) or not custom_id:
        v.error("invalid_custom_id", lineno, "'custom_id' must be a non-empty string", "custom_id")
        return
    digest = xxhash.xxh3_128_digest(custom_id.encode("utf-8", "surrogatepass"))
    if digest in seen:
        v.error(
            "duplicate_custom_id",
            lineno,
            f"the custom_id {quote(custom_id)} is used more than once in this file",
            "custom_id",
        )
        return
    seen.add(digest)
    if obj["method"] != "POST":
        v.error("invalid_method", lineno, "'method' must be 'POST'", "method")
        return
    if obj["url"] != endpoint:
        v.error(
            "invalid_url",
            lineno,
            f"'url' is {quote(obj['url'])}; this batch's endpoint is {endpoint!r}",
            "url",
        )
        return
    body = obj["body"]
    if not isinstance(body, dict):
        v.error("invalid_body", lineno, "'body' must be a JSON object", "body")
        return
    model = body.get("model")
    if not isinstance(model, str):
        v.error("missing_required_parameter", lineno, "'body.model' is required", "body.model")
        return
    try:
        entry = catalog.get(model)
    except CatalogError:
        entry = None
    if entry is None or model not in settings.models or entry.capability != capability:
        v.error(
            "model_not_found",
            lineno,
            f"the model {quote(model)} is not served for {endpoint}",
            "body.model",
        )
        return
    if v.model is None:
        v.model = model
    elif model != v.model:
        v.error(
            "mismatched_model",
            lineno,
            f"all requests in a batch must use one model; line {lineno} uses {quote(model)}, "
            f"earlier lines {v.model!r}",
            "body.model",
        )
