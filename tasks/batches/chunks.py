"""Chunk execution in three steps: claim, compute, commit.

Chunk states: ``pending -> running -> done``; ``failed`` (delivered too often: its
requests fail as ``chunk_failed``), or ``cancelled``. Workers claim pending chunks straight
from the database when they have room for one (``claim_chunk``), so a chunk is never sent
to a worker that cannot start it, and none waits in a worker's thread. A claim bumps
``attempts``, which fences the commit: only the run that claimed the chunk last may commit
it, so a chunk run twice never adds an output line twice. The claimant renews the
chunk's lease for the whole life of the run (``Heartbeat``); the reaper puts a running
chunk back to pending only when that lease runs out (its worker died or froze).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, or_, select, update

from configs import tracing
from configs.settings import Settings
from tasks.batches.leases import Heartbeat
from tasks.batches.leftovers import parts_dir
from tasks.batches.lines import Outcome, iter_requests, output_line, request_id
from tasks.batches.status import now
from tasks.batches.usage import record_chunk_usage
from tasks.errors import LanewayError
from tasks.filestore import FileStore
from tasks.store.db import session_scope
from tasks.store.models import BatchRow, ChunkRow, FileRow
from tasks.store.usage import Usage

log = logging.getLogger(__name__)
REQUESTS = logging.getLogger("laneway.requests")  # one line per request (JSON logs)

UNFINISHED = ("pending", "running")
FINISHED_CHUNK = ("done", "failed")  # committed, with results (failed: chunk_failed lines)
# pending chunks looked at per claim: a few, in case another worker takes the first
CLAIM_CANDIDATES = 8

# a capability's executor: (model, request bodies, their request ids, the batch's owner)
# -> one Outcome each; the owner is whose files a line may name (audio's ``file``)
Executor = Callable[[str, list[dict[str, Any]], list[str], str | None], list[Outcome]]


@dataclass(frozen=True)
class ChunkClaim:
    """One run of one chunk: everything needed to compute and commit it."""

    chunk_id: int
    batch_id: str
    index: int
    attempt: int
    line_start: int
    byte_start: int
    byte_end: int
    input_key: str
    model: str
    owner: str | None = None
    # the W3C context of the request that made the batch: its spans' parent
    trace_context: dict[str, str] | None = None

    @property
    def part_key(self) -> str:
        """Where this run writes its results (``.out`` and ``.err``)."""
        return f"{parts_dir(self.batch_id)}/chunk-{self.index:06d}-{self.attempt}"

    def __str__(self) -> str:
        return f"chunk {self.index} of {self.batch_id} (attempt {self.attempt})"


# -- claim --------------------------------------------------------------------------------


def claim_chunk(*, settings: Settings, capability: str, models: list[str]) -> ChunkClaim | None:
    """Take the oldest pending chunk this worker can compute (its batch in progress, its
    model served here); None when there is none."""
    t = now()
    with session_scope() as s:
        candidates = s.execute(
            select(ChunkRow.id, ChunkRow.attempts)
            .join(BatchRow, BatchRow.id == ChunkRow.batch_id)
            .where(
                ChunkRow.state == "pending",
                BatchRow.status == "in_progress",
                BatchRow.capability == capability,
                BatchRow.model.in_(models),
                or_(BatchRow.expires_at.is_(None), BatchRow.expires_at > t),
            )
            .order_by(BatchRow.created_at, BatchRow.id, ChunkRow.index)
            .limit(CLAIM_CANDIDATES)
        ).all()
    for chunk_id, attempts in candidates:
        claim = _try_claim(chunk_id, attempts, settings)
        if claim is not None:
            return claim
    return None


def _try_claim(chunk_id: int, attempts: int, settings: Settings) -> ChunkClaim | None:
    with session_scope() as s:
        won = s.execute(
            update(ChunkRow)
            .where(
                ChunkRow.id == chunk_id,
                ChunkRow.state == "pending",
                ChunkRow.attempts == attempts,
            )
            .values(
                state="running", attempts=attempts + 1, lease_until=now() + settings.chunk_lease_s
            )
        ).rowcount  # type: ignore[attr-defined]
        if won != 1:
            return None
        chunk = s.get(ChunkRow, chunk_id)
        assert chunk is not None
        batch = s.get(BatchRow, chunk.batch_id)
        assert batch is not None
        # the input stays while its batch is open, even when deleted or expired for the API
        input_row = s.get(FileRow, batch.input_file_id)
        return ChunkClaim(
            chunk_id=chunk_id,
            batch_id=batch.id,
            index=chunk.index,
            attempt=attempts + 1,
            line_start=chunk.line_start,
            byte_start=chunk.byte_start,
            byte_end=chunk.byte_end,
            input_key=input_row.storage_key if input_row is not None else "",
            model=batch.model or "",
            owner=batch.owner,
            trace_context=batch.trace_context,
        )


def _owned(claim: ChunkClaim) -> tuple[ColumnElement[bool], ...]:
    """The fence: the chunk is still running this run's attempt."""
    return (
        ChunkRow.id == claim.chunk_id,
        ChunkRow.attempts == claim.attempt,
        ChunkRow.state == "running",
    )


def _while_owned(claim: ChunkClaim, **values: object) -> bool:
    """Update the chunk only while this run still owns it; False once another does."""
    with session_scope() as s:
        moved = s.execute(update(ChunkRow).where(*_owned(claim)).values(**values)).rowcount  # type: ignore[attr-defined]
    return bool(moved == 1)


def renew_chunk(claim: ChunkClaim, settings: Settings) -> bool:
    """Push the chunk's lease out; False once another run owns the chunk."""
    return _while_owned(claim, lease_until=now() + settings.chunk_lease_s)


def release_chunk(claim: ChunkClaim) -> None:
    """Give a claimed chunk back at once (its run broke): the next claim retries it, and
    ``attempts`` keeps counting toward ``chunk_max_attempts``."""
    _while_owned(claim, state="pending", lease_until=None)


# -- compute --------------------------------------------------------------------------------


@dataclass
class ChunkResult:
    completed: int = 0
    failed: int = 0
    usage: Usage = field(default_factory=Usage)


def _gave_up(claim: ChunkClaim, request_ids: list[str]) -> list[Outcome]:
    log.error(
        "%s: delivered %d times without finishing; failing its requests", claim, claim.attempt - 1
    )
    return [
        Outcome.error(
            LanewayError(
                f"the request's chunk was delivered {claim.attempt - 1} times without "
                "finishing; giving up",
                code="chunk_failed",
            )
        )
        for _ in request_ids
    ]


def compute_chunk(
    claim: ChunkClaim, *, settings: Settings, store: FileStore, execute: Executor
) -> ChunkResult:
    """Run the chunk's requests and write their lines to this run's part files."""
    requests = list(iter_requests(store, claim.input_key, claim.byte_start, claim.byte_end))
    ids = [request_id(claim.batch_id, claim.line_start + i) for i in range(len(requests))]
    if claim.attempt > settings.chunk_max_attempts:
        outcomes = _gave_up(claim, ids)
    elif tracing.TRACER is None:
        outcomes = execute(claim.model, [r["body"] for r in requests], ids, claim.owner)
    else:  # a span per line, which the executor's jobs find by request id
        with tracing.LineSpans(ids, claim.batch_id) as lines:
            outcomes = execute(claim.model, [r["body"] for r in requests], ids, claim.owner)
            lines.outcomes([o.status_code for o in outcomes])
    result = ChunkResult()
    out: list[bytes] = []
    err: list[bytes] = []
    log_lines = REQUESTS.isEnabledFor(logging.INFO)  # JSON logs only (configs/logs.py)
    for i, (req, outcome) in enumerate(zip(requests, outcomes, strict=True)):
        line = output_line(claim.batch_id, claim.line_start + i, req["custom_id"], outcome)
        if log_lines:  # under the id the output line carries as response.request_id
            fields = {
                "batch_id": claim.batch_id,
                "model": claim.model,
                "status": outcome.status_code,
                "owner": claim.owner,  # the batch's key owner (None: no keys)
            }
            REQUESTS.info("batch request", extra={"request_id": ids[i], "fields": fields})
        if outcome.status_code == 200:
            out.append(line)
            result.completed += 1
            result.usage += outcome.usage
        else:
            err.append(line)
            result.failed += 1
    store.write_lines(claim.part_key + ".out", iter(out))
    store.write_lines(claim.part_key + ".err", iter(err))
    return result


# -- commit ---------------------------------------------------------------------------------


def commit_chunk(claim: ChunkClaim, result: ChunkResult, *, settings: Settings) -> bool:
    """Record the run's results and add its counts to the batch, in one transaction,
    only if this run still owns the chunk."""
    with session_scope() as s:
        committed = s.execute(
            update(ChunkRow)
            .where(*_owned(claim))
            .values(
                state="done" if claim.attempt <= settings.chunk_max_attempts else "failed",
                result_key=claim.part_key,
                lease_until=None,
                completed=result.completed,
                failed=result.failed,
            )
        ).rowcount  # type: ignore[attr-defined]
        if committed == 1:  # the batch's counts and usage move in the same transaction
            s.execute(
                update(BatchRow)
                .where(BatchRow.id == claim.batch_id)
                .values(
                    request_completed=BatchRow.request_completed + result.completed,
                    request_failed=BatchRow.request_failed + result.failed,
                )
            )
            record_chunk_usage(s, claim.batch_id, claim.index, result.usage)
    return bool(committed == 1)


def run_chunk(
    claim: ChunkClaim, *, settings: Settings, store: FileStore, execute: Executor
) -> bool:
    """Compute and commit a claimed chunk, its lease renewed the whole time; returns
    whether this run's results counted. Traced, it is a span in the batch's trace."""
    attributes = {
        "laneway.batch_id": claim.batch_id,
        "laneway.chunk": claim.index,
        "laneway.attempt": claim.attempt,
    }
    with tracing.maybe("batch chunk", claim.trace_context, attributes):
        return _run_chunk(claim, settings=settings, store=store, execute=execute)


def _run_chunk(
    claim: ChunkClaim, *, settings: Settings, store: FileStore, execute: Executor
) -> bool:
    try:
        with Heartbeat(
            lambda: renew_chunk(claim, settings), settings.chunk_lease_s / 3, str(claim)
        ):
            result = compute_chunk(claim, settings=settings, store=store, execute=execute)
            committed = commit_chunk(claim, result, settings=settings)
    except Exception:
        log.exception("%s failed; giving it back", claim)
        release_chunk(claim)
        committed = False
    if not committed:  # another run owns this chunk now (or ours broke): ours never counted
        log.info("%s: not committed; discarding its results", claim)
        store.delete(claim.part_key + ".out")
        store.delete(claim.part_key + ".err")
    return committed
