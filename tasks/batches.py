"""Batch API orchestration. The database is the source of truth; Redis only carries hints.

Life of a batch::

    validating ──> in_progress ──> finalizing ──> completed
        │  │            │  │
        │  └─> failed   │  └─> expired      (past completion_window)
        └──────────> cancelling ──> cancelled

Chunks: ``pending -> queued -> running -> done``; or ``failed`` (too many deliveries) or
``cancelled``. A queued chunk whose message may be lost is sent again once ``lease_until``
passes; a running chunk whose worker died goes back to queued when its lease runs out. The
``attempts`` counter fences commits: only the run that claimed the chunk last may commit it,
so a redelivered chunk never adds an output line twice. ``advance()`` moves a batch forward
from whatever state the database says it is in; the reaper calls it for every open batch,
so every step survives a crash of whoever was doing it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from configs.catalog import Catalog, CatalogError
from configs.settings import Settings
from tasks.db import session_scope
from tasks.errors import InvalidRequest, LanewayError, NotFound
from tasks.files import check_expires_after, expire_files, get_file, put_output_file
from tasks.filestore import FileStore
from tasks.models import BatchRow, ChunkRow, FileRow
from tasks.names import BATCH, queue_name, task_name

log = logging.getLogger(__name__)

ADVANCE_TASK = "laneway.batches.advance"
COMPLETION_WINDOWS = {"24h": 24 * 3600}
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512
MAX_ERRORS_REPORTED = 1000

# endpoint -> capability; capabilities add theirs with register_endpoint()
BATCH_ENDPOINTS: dict[str, str] = {}


def register_endpoint(endpoint: str, capability: str) -> None:
    BATCH_ENDPOINTS[endpoint] = capability


register_endpoint("/v1/embeddings", "embeddings")

OPEN_STATUSES = ("validating", "in_progress", "finalizing", "cancelling")
LEGAL: dict[str, set[str]] = {
    "validating": {"in_progress", "failed", "cancelling", "expired"},
    "in_progress": {"finalizing", "cancelling", "expired"},
    "finalizing": {"completed"},
    "cancelling": {"cancelled"},
}
TIMESTAMP_FIELD = {
    "in_progress": "in_progress_at",
    "finalizing": "finalizing_at",
    "completed": "completed_at",
    "failed": "failed_at",
    "expired": "expired_at",
    "cancelling": "cancelling_at",
    "cancelled": "cancelled_at",
}


class BatchNotCancellable(InvalidRequest):
    default_code = "batch_not_cancellable"


def transition(session: Session, batch_id: str, to: str, **values: Any) -> bool:
    """The one way a batch changes status: compare-and-set from a legal source status.

    Returns False (and changes nothing) when the batch is not in a status that may move
    to ``to``; raises ValueError for a status that does not exist.
    """
    if to not in TIMESTAMP_FIELD:
        raise ValueError(f"unknown batch status {to!r}")
    sources = [src for src, targets in LEGAL.items() if to in targets]
    result = session.execute(
        update(BatchRow)
        .where(BatchRow.id == batch_id, BatchRow.status.in_(sources))
        .values(status=to, **{TIMESTAMP_FIELD[to]: int(time.time())}, **values)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


# -- objects -----------------------------------------------------------------------------


def batch_object(row: BatchRow) -> dict[str, Any]:
    tokens = int(row.prompt_tokens or 0)
    return {
        "id": row.id,
        "object": "batch",
        "endpoint": row.endpoint,
        "model": row.model,
        "errors": {"object": "list", "data": row.errors} if row.errors else None,
        "input_file_id": row.input_file_id,
        "completion_window": row.completion_window,
        "status": row.status,
        "output_file_id": row.output_file_id,
        "error_file_id": row.error_file_id,
        "created_at": row.created_at,
        "in_progress_at": row.in_progress_at,
        "expires_at": row.expires_at,
        "finalizing_at": row.finalizing_at,
        "completed_at": row.completed_at,
        "failed_at": row.failed_at,
        "expired_at": row.expired_at,
        "cancelling_at": row.cancelling_at,
        "cancelled_at": row.cancelled_at,
        "request_counts": {
            "total": row.request_total,
            "completed": row.request_completed,
            "failed": row.request_failed,
        },
        "metadata": row.metadata_,
        "usage": {
            "input_tokens": tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 0,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": tokens,
        },
    }


def check_metadata(metadata: Any) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise InvalidRequest("'metadata' must be an object of strings", param="metadata")
    if len(metadata) > MAX_METADATA_PAIRS:
        raise InvalidRequest(
            f"'metadata' may have at most {MAX_METADATA_PAIRS} pairs, got {len(metadata)}",
            param="metadata",
        )
    for key, value in metadata.items():
        if not isinstance(value, str) or len(key) > MAX_METADATA_KEY:
            raise InvalidRequest(
                f"metadata keys are strings of at most {MAX_METADATA_KEY} characters and "
                f"values strings of at most {MAX_METADATA_VALUE}",
                param="metadata",
            )
        if len(value) > MAX_METADATA_VALUE:
            raise InvalidRequest(
                f"metadata value for {key!r} is longer than {MAX_METADATA_VALUE} characters",
                param="metadata",
            )
    return dict(metadata)


def create_batch(
    session: Session,
    *,
    settings: Settings,
    input_file_id: str,
    endpoint: str,
    completion_window: str,
    metadata: Any = None,
    output_expires_after: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
) -> tuple[BatchRow, bool]:
    """A new batch in ``validating`` (or the one created earlier with the same key).

    Returns (row, created)."""
    if idempotency_key:
        found = session.scalars(
            select(BatchRow).where(BatchRow.idempotency_key == idempotency_key)
        ).first()
        if found is not None:
            return found, False
    if endpoint not in BATCH_ENDPOINTS:
        raise InvalidRequest(
            f"endpoint {endpoint!r} is not supported; supported: {', '.join(BATCH_ENDPOINTS)}",
            param="endpoint",
            code="invalid_endpoint",
        )
    if completion_window not in COMPLETION_WINDOWS:
        raise InvalidRequest(
            f"completion_window must be one of {', '.join(COMPLETION_WINDOWS)}",
            param="completion_window",
        )
    metadata = check_metadata(metadata)
    out_exp = output_expires_after or {}
    if not isinstance(out_exp, dict):
        raise InvalidRequest(
            "'output_expires_after' must be an object", param="output_expires_after"
        )
    out_seconds = check_expires_after(
        out_exp.get("anchor"), out_exp.get("seconds"), param="output_expires_after"
    )
    try:
        file_row = get_file(session, input_file_id)
    except NotFound:
        raise NotFound(f"No such File object: {input_file_id}", param="input_file_id") from None
    if file_row.purpose != "batch":
        raise InvalidRequest(
            f"file {input_file_id} has purpose {file_row.purpose!r}; batches need 'batch'",
            param="input_file_id",
        )
    now = int(time.time())
    window = settings.completion_window_s or COMPLETION_WINDOWS[completion_window]
    row = BatchRow(
        id=f"batch_{uuid.uuid4().hex[:24]}",
        endpoint=endpoint,
        input_file_id=input_file_id,
        completion_window=completion_window,
        status="validating",
        capability=BATCH_ENDPOINTS[endpoint],
        created_at=now,
        expires_at=now + window,
        metadata_=metadata,
        output_expires_after={"anchor": "created_at", "seconds": out_seconds}
        if out_seconds
        else None,
        idempotency_key=idempotency_key or None,
        request_total=0,
        request_completed=0,
        request_failed=0,
        prompt_tokens=0,
    )
    session.add(row)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        found = session.scalars(
            select(BatchRow).where(BatchRow.idempotency_key == idempotency_key)
        ).first()
        if found is None:
            raise
        return found, False
    return row, True


def get_batch(session: Session, batch_id: str) -> BatchRow:
    row = session.get(BatchRow, batch_id)
    if row is None:
        raise NotFound(f"No such Batch object: {batch_id}", param="batch_id")
    return row


def request_cancel(session: Session, batch_id: str) -> BatchRow:
    row = get_batch(session, batch_id)
    if row.status in ("cancelling", "cancelled"):
        return row
    # a validator's claim would hold up the finish of the cancel; its own move to
    # in_progress fails once the batch is cancelling, so it needs no claim any more
    release = {"lease_until": None} if row.status == "validating" else {}
    if not transition(session, batch_id, "cancelling", **release):
        raise BatchNotCancellable(
            f"Cannot cancel a batch with status {row.status!r}.", param="batch_id"
        )
    session.execute(
        update(ChunkRow)
        .where(ChunkRow.batch_id == batch_id, ChunkRow.state.in_(("pending", "queued")))
        .values(state="cancelled", lease_until=None)
    )
    session.flush()
    session.refresh(row)
    return row


# -- validation ---------------------------------------------------------------------------


@dataclass
class ChunkSpec:
    line_start: int  # request index (0-based) of the first request
    line_end: int
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
    seen: set[str] = set()
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
                v.chunks.append(ChunkSpec(chunk_first, v.total, chunk_byte, offset))
                chunk_first, chunk_byte = v.total, offset
            if len(v.errors) >= MAX_ERRORS_REPORTED:
                break
    if v.total > chunk_first:
        v.chunks.append(ChunkSpec(chunk_first, v.total, chunk_byte, offset))
    if v.total == 0 and not v.errors:
        v.error("empty_file", None, "the input file has no requests")
    return v


def _check_line(
    v: Validation,
    raw: bytes,
    lineno: int,
    seen: set[str],
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
    if custom_id in seen:
        v.error(
            "duplicate_custom_id",
            lineno,
            f"the custom_id {custom_id!r} is used more than once in this file",
            "custom_id",
        )
        return
    seen.add(custom_id)
    if obj["method"] != "POST":
        v.error("invalid_method", lineno, "'method' must be 'POST'", "method")
        return
    if obj["url"] != endpoint:
        v.error(
            "invalid_url",
            lineno,
            f"'url' is {obj['url']!r}; this batch's endpoint is {endpoint!r}",
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
            f"the model {model!r} is not served for {endpoint}",
            "body.model",
        )
        return
    if v.model is None:
        v.model = model
    elif model != v.model:
        v.error(
            "mismatched_model",
            lineno,
            f"all requests in a batch must use one model; line {lineno} uses {model!r}, "
            f"earlier lines {v.model!r}",
            "body.model",
        )


# -- execution ----------------------------------------------------------------------------


@dataclass
class Outcome:
    """One request's result: the HTTP status and body the endpoint would have answered."""

    status_code: int
    body: dict[str, Any]
    prompt_tokens: int = 0


# a capability's executor: (model, request bodies, renew lease) -> one Outcome per body
Executor = Callable[[str, list[dict[str, Any]], Callable[[], None]], list[Outcome]]


def _ident(prefix: str, batch_id: str, line: int) -> str:
    return prefix + hashlib.sha256(f"{batch_id}:{line}".encode()).hexdigest()[:24]


def _output_line(batch_id: str, index: int, custom_id: str, outcome: Outcome) -> bytes:
    return (
        json.dumps(
            {
                "id": _ident("batch_req_", batch_id, index),
                "custom_id": custom_id,
                "response": {
                    "status_code": outcome.status_code,
                    "request_id": _ident("req_", batch_id, index),
                    "body": outcome.body,
                },
                "error": None,
            },
            separators=(",", ":"),
        ).encode()
        + b"\n"
    )


def _expired_line(batch_id: str, index: int, custom_id: str) -> bytes:
    return (
        json.dumps(
            {
                "id": _ident("batch_req_", batch_id, index),
                "custom_id": custom_id,
                "response": None,
                "error": {
                    "code": "batch_expired",
                    "message": "This request could not be executed before the completion "
                    "window expired.",
                },
            },
            separators=(",", ":"),
        ).encode()
        + b"\n"
    )


def chunk_requests(store: FileStore, storage_key: str, chunk: ChunkRow) -> list[dict[str, Any]]:
    raw = store.read_range(storage_key, chunk.byte_start, chunk.byte_end)
    return [json.loads(line) for line in raw.splitlines() if line.strip()]


def _chunk_key(batch_id: str, index: int, attempt: int) -> str:
    return f"batches/{batch_id}/chunk-{index:06d}-{attempt}"


def _now() -> float:
    return time.time()


def run_chunk(
    chunk_id: int,
    *,
    settings: Settings,
    store: FileStore,
    execute: Executor,
) -> None:
    """Claim, compute and commit one chunk; then move its batch on."""
    with session_scope() as s:
        chunk = s.get(ChunkRow, chunk_id)
        if chunk is None:
            return
        batch = s.get(BatchRow, chunk.batch_id)
        now = _now()
        claimable = chunk.state == "queued" or (
            chunk.state == "running" and (chunk.lease_until or 0) < now
        )
        if batch is None or not claimable:
            return
        batch_id = batch.id
        if batch.status != "in_progress":
            s.execute(
                update(ChunkRow)
                .where(ChunkRow.id == chunk_id, ChunkRow.state == chunk.state)
                .values(state="cancelled", lease_until=None)
            )
            attempt = -1
        else:
            attempt = chunk.attempts + 1
            claimed = s.execute(
                update(ChunkRow)
                .where(
                    ChunkRow.id == chunk_id,
                    ChunkRow.attempts == chunk.attempts,
                    ChunkRow.state == chunk.state,
                )
                .values(state="running", attempts=attempt, lease_until=now + settings.chunk_lease_s)
            ).rowcount  # type: ignore[attr-defined]
            if claimed != 1:
                return
        file_key = get_file_key(s, batch.input_file_id)
        model, index = batch.model or "", chunk.index
        line_start = chunk.line_start
        spec = (chunk.byte_start, chunk.byte_end)
    if attempt < 0:
        advance(batch_id, settings=settings, store=store)
        return
    requests = [json.loads(x) for x in store.read_range(file_key, *spec).splitlines() if x.strip()]

    def renew() -> None:
        with session_scope() as s2:
            s2.execute(
                update(ChunkRow)
                .where(
                    ChunkRow.id == chunk_id,
                    ChunkRow.attempts == attempt,
                    ChunkRow.state == "running",
                )
                .values(lease_until=_now() + settings.chunk_lease_s)
            )

    if attempt > settings.chunk_max_attempts:
        log.error(
            "chunk %d of %s failed %d times; failing its requests", index, batch_id, attempt - 1
        )
        outcomes = [
            Outcome(
                500,
                {
                    "error": {
                        "message": f"the request's chunk was delivered {attempt - 1} times without "
                        "finishing; giving up",
                        "type": "server_error",
                        "param": None,
                        "code": "chunk_failed",
                    }
                },
            )
            for _ in requests
        ]
    else:
        try:
            outcomes = execute(model, [r["body"] for r in requests], renew)
        except LanewayError as exc:
            body = {
                "error": {
                    "message": exc.message,
                    "type": exc.error_type,
                    "param": exc.param,
                    "code": exc.code,
                }
            }
            outcomes = [Outcome(exc.status_code, body) for _ in requests]
    key = _chunk_key(batch_id, index, attempt)
    ok = [
        (i, r, o)
        for i, (r, o) in enumerate(zip(requests, outcomes, strict=True))
        if o.status_code == 200
    ]
    bad = [
        (i, r, o)
        for i, (r, o) in enumerate(zip(requests, outcomes, strict=True))
        if o.status_code != 200
    ]
    store.write_lines(
        key + ".out", (_output_line(batch_id, line_start + i, r["custom_id"], o) for i, r, o in ok)
    )
    store.write_lines(
        key + ".err", (_output_line(batch_id, line_start + i, r["custom_id"], o) for i, r, o in bad)
    )
    tokens = sum(o.prompt_tokens for o in outcomes)
    with session_scope() as s:
        committed = s.execute(
            update(ChunkRow)
            .where(
                ChunkRow.id == chunk_id, ChunkRow.attempts == attempt, ChunkRow.state == "running"
            )
            .values(
                state="done" if attempt <= settings.chunk_max_attempts else "failed",
                result_key=key,
                lease_until=None,
                completed=len(ok),
                failed=len(bad),
                prompt_tokens=tokens,
            )
        ).rowcount  # type: ignore[attr-defined]
        if committed == 1:
            s.execute(
                update(BatchRow)
                .where(BatchRow.id == batch_id)
                .values(
                    request_completed=BatchRow.request_completed + len(ok),
                    request_failed=BatchRow.request_failed + len(bad),
                    prompt_tokens=BatchRow.prompt_tokens + tokens,
                )
            )
    if committed != 1:  # another run owns this chunk now; ours never counted
        log.info("chunk %d of %s: attempt %d lost its lease; discarding", index, batch_id, attempt)
        store.delete(key + ".out")
        store.delete(key + ".err")
    advance(batch_id, settings=settings, store=store)


def get_file_key(session: Session, file_id: str) -> str:
    """Where a batch's input lives. Not ``get_file``: a batch keeps reading its input after
    the file was deleted or expired for the API (tasks.files removes it once it is over)."""
    row = session.get(FileRow, file_id)
    if row is None or row.deleted:
        raise NotFound(f"No such File object: {file_id}", param="input_file_id")
    return row.storage_key


# -- moving batches on ---------------------------------------------------------------------


def enqueue_chunks(capability: str, chunk_ids: list[int]) -> None:
    from tasks.celery_app import get_celery

    app = get_celery()
    for chunk_id in chunk_ids:
        app.send_task(
            task_name(capability, BATCH), args=[chunk_id], queue=queue_name(capability, BATCH)
        )


def enqueue_advance(capability: str, batch_id: str) -> None:
    from tasks.celery_app import get_celery

    get_celery().send_task(ADVANCE_TASK, args=[batch_id], queue=queue_name(capability, BATCH))


def _claim_batch(session: Session, batch_id: str, status: str, lease_s: float) -> bool:
    """Take the batch-level lease (validation or finalisation); False if someone holds it."""
    now = _now()
    result = session.execute(
        update(BatchRow)
        .where(
            BatchRow.id == batch_id,
            BatchRow.status == status,
            (BatchRow.lease_until.is_(None)) | (BatchRow.lease_until < now),
        )
        .values(lease_until=now + lease_s)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def start(batch_id: str, *, settings: Settings, catalog: Catalog, store: FileStore) -> None:
    """validating -> in_progress (chunks recorded and queued) or failed (errors listed)."""
    with session_scope() as s:
        if not _claim_batch(s, batch_id, "validating", settings.chunk_lease_s):
            return
        batch = get_batch(s, batch_id)
        file_row = s.get(FileRow, batch.input_file_id)
        if file_row is None or file_row.deleted:
            key, size = "", -1
        else:  # also when deleted or expired for the API since the batch was created
            key, size = file_row.storage_key, file_row.bytes
        endpoint = batch.endpoint
    if size < 0:
        v = Validation()
        v.error("file_not_found", None, "the input file was deleted before validation")
    else:
        v = validate_input(
            settings=settings,
            catalog=catalog,
            store=store,
            storage_key=key,
            size=size,
            endpoint=endpoint,
        )
    with session_scope() as s:
        if v.errors:
            transition(
                s, batch_id, "failed", errors=v.errors, request_total=v.total, lease_until=None
            )
            return
        try:
            for i, spec in enumerate(v.chunks):
                s.add(
                    ChunkRow(
                        batch_id=batch_id,
                        index=i,
                        line_start=spec.line_start,
                        line_end=spec.line_end,
                        byte_start=spec.byte_start,
                        byte_end=spec.byte_end,
                        state="pending",
                        attempts=0,
                        completed=0,
                        failed=0,
                        prompt_tokens=0,
                    )
                )
            s.flush()
        except IntegrityError:  # a second validator got there first
            s.rollback()
            return
        if not transition(
            s, batch_id, "in_progress", model=v.model, request_total=v.total, lease_until=None
        ):
            s.rollback()  # cancelled while validating: no chunks wanted
    advance(batch_id, settings=settings, store=store)


def advance(
    batch_id: str,
    *,
    settings: Settings,
    store: FileStore,
    catalog: Catalog | None = None,
) -> None:
    """Do whatever the batch needs next, judged from the database alone. Idempotent."""
    with session_scope() as s:
        batch = s.get(BatchRow, batch_id)
        if batch is None or batch.status not in OPEN_STATUSES:
            return
        status, capability = batch.status, batch.capability or ""
        expired = batch.expires_at is not None and batch.expires_at <= _now()
    if status == "validating":
        if expired:
            with session_scope() as s:
                transition(s, batch_id, "expired", lease_until=None)
            return
        if catalog is not None:
            start(batch_id, settings=settings, catalog=catalog, store=store)
        else:
            enqueue_advance(capability, batch_id)
        return
    if status == "in_progress" and expired:
        _finish(batch_id, "expired", settings=settings, store=store)
        return
    with session_scope() as s:
        counts = dict(
            s.execute(
                select(ChunkRow.state, func.count())
                .where(ChunkRow.batch_id == batch_id)
                .group_by(ChunkRow.state)
            ).all()
        )
    busy = counts.get("queued", 0) + counts.get("running", 0)
    if status == "in_progress":
        if counts.get("pending", 0) == 0 and busy == 0:
            with session_scope() as s:  # not while an expiring finisher holds the batch
                moved = _claim_batch(
                    s, batch_id, "in_progress", settings.chunk_lease_s
                ) and transition(
                    s, batch_id, "finalizing", lease_until=_now() + settings.chunk_lease_s
                )
            if moved:
                _finish(batch_id, "completed", settings=settings, store=store)
        else:
            _pump(batch_id, capability, busy, settings)
    elif status == "cancelling" and busy == 0:
        _finish(batch_id, "cancelled", settings=settings, store=store)
    elif status == "finalizing":
        with session_scope() as s:
            stale = _claim_batch(s, batch_id, "finalizing", settings.chunk_lease_s)
        if stale:  # whoever was finalising died: do it again (files are rewritten whole)
            _finish(batch_id, "completed", settings=settings, store=store)


def _pump(batch_id: str, capability: str, busy: int, settings: Settings) -> None:
    """Keep a few chunks of this batch queued; the rest wait in the database."""
    room = settings.batch_queued_chunks - busy
    if room <= 0:
        return
    with session_scope() as s:
        ids = list(
            s.scalars(
                select(ChunkRow.id)
                .where(ChunkRow.batch_id == batch_id, ChunkRow.state == "pending")
                .order_by(ChunkRow.index)
                .limit(room)
            )
        )
        if not ids:
            return
        s.execute(
            update(ChunkRow)
            .where(ChunkRow.id.in_(ids), ChunkRow.state == "pending")
            .values(state="queued", lease_until=_now() + settings.chunk_queue_timeout_s)
        )
    enqueue_chunks(capability, ids)


def _result_file(
    store: FileStore, batch_id: str, kind: str, parts: list[str], expires_after_s: int | None
) -> str:
    """The batch's output or error file: the parts joined in order, recorded as a File.

    Its id derives from the batch, so a finisher that runs again rewrites the same file."""
    file_id = "file-" + hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()[:24]
    size = store.concat(f"files/{file_id}", parts)
    with session_scope() as s:
        put_output_file(
            s,
            file_id=file_id,
            key=f"files/{file_id}",
            filename=f"{batch_id}_{kind}.jsonl",
            size=size,
            expires_after_s=expires_after_s,
        )
    return file_id


def _finish(batch_id: str, to: str, *, settings: Settings, store: FileStore) -> None:
    """Write the output and error files from the committed chunks, then move to ``to``.

    The finisher holds the batch's lease (for ``completed`` the move to finalizing took
    it): two finishers at once would each rewrite the files, and the one that lost the
    race would do so after the winner removed the chunk results, leaving them empty.
    """
    source = {"cancelled": "cancelling", "expired": "in_progress"}.get(to)
    if source is not None:
        with session_scope() as s:
            if not _claim_batch(s, batch_id, source, settings.chunk_lease_s):
                return
    with session_scope() as s:
        batch = get_batch(s, batch_id)
        if to == "expired":
            s.execute(
                update(ChunkRow)
                .where(
                    ChunkRow.batch_id == batch_id,
                    ChunkRow.state.in_(("pending", "queued", "running")),
                )
                .values(state="cancelled", lease_until=None)
            )
        chunks = list(
            s.scalars(
                select(ChunkRow).where(ChunkRow.batch_id == batch_id).order_by(ChunkRow.index)
            )
        )
        input_key = get_file_key(s, batch.input_file_id) if to == "expired" else ""
        out_exp = (batch.output_expires_after or {}).get("seconds")
        done = [c for c in chunks if c.state in ("done", "failed") and c.result_key]
        unfinished = [c for c in chunks if c not in done]
    completed = sum(c.completed for c in done)
    failed = sum(c.failed for c in done)
    tokens = sum(c.prompt_tokens for c in done)
    expires_after_s = int(out_exp) if out_exp else None
    output_id = error_id = None
    if completed:
        output_id = _result_file(
            store, batch_id, "output", [f"{c.result_key}.out" for c in done], expires_after_s
        )
    expired_lines: Iterator[bytes] = iter(())
    expired_count = 0
    if to == "expired" and unfinished:
        pending_requests = [
            (c.line_start + i, r["custom_id"])
            for c in unfinished
            for i, r in enumerate(chunk_requests(store, input_key, c))
        ]
        expired_count = len(pending_requests)
        expired_lines = iter([_expired_line(batch_id, i, cid) for i, cid in pending_requests])
    if failed or expired_count:
        parts_key = f"batches/{batch_id}/expired.err"
        store.write_lines(parts_key, expired_lines)
        error_id = _result_file(
            store,
            batch_id,
            "error",
            [f"{c.result_key}.err" for c in done] + [parts_key],
            expires_after_s,
        )
    with session_scope() as s:
        moved = transition(
            s,
            batch_id,
            to,
            output_file_id=output_id,
            error_file_id=error_id,
            request_completed=completed,
            request_failed=failed + expired_count,
            prompt_tokens=tokens,
            lease_until=None,
        )
    if moved:
        store.delete_tree(f"batches/{batch_id}")
        log.info(
            "batch %s %s: %d completed, %d failed", batch_id, to, completed, failed + expired_count
        )


# -- the reaper ---------------------------------------------------------------------------


def reap(*, settings: Settings, store: FileStore, catalog: Catalog) -> None:
    """Re-send chunks whose message or worker was lost and move every open batch on."""
    now = _now()
    resend: dict[str, list[int]] = {}
    with session_scope() as s:
        rows = s.execute(
            select(ChunkRow.id, ChunkRow.state, BatchRow.capability)
            .join(BatchRow, BatchRow.id == ChunkRow.batch_id)
            .where(ChunkRow.state.in_(("queued", "running")), ChunkRow.lease_until < now)
        ).all()
        for chunk_id, state, capability in rows:
            moved = s.execute(
                update(ChunkRow)
                .where(ChunkRow.id == chunk_id, ChunkRow.state == state, ChunkRow.lease_until < now)
                .values(state="queued", lease_until=now + settings.chunk_queue_timeout_s)
            ).rowcount  # type: ignore[attr-defined]
            if moved == 1:
                resend.setdefault(capability or "", []).append(chunk_id)
        open_ids = list(s.scalars(select(BatchRow.id).where(BatchRow.status.in_(OPEN_STATUSES))))
        expire_files(s, store=store)
    for capability, ids in resend.items():
        log.warning("re-sending %d %s chunk(s) whose lease ran out", len(ids), capability)
        enqueue_chunks(capability, ids)
    for batch_id in open_ids:
        try:
            advance(batch_id, settings=settings, store=store, catalog=catalog)
        except Exception:
            log.exception("could not advance batch %s", batch_id)
