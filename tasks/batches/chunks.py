"""Chunk execution in three steps: claim, compute, commit.

Chunk states: ``pending -> running -> done``; ``failed`` (delivered too often: its
requests fail as ``chunk_failed``), or ``cancelled``. Workers claim pending chunks straight
from the database when they have room for one (``claim_chunk``), so a chunk is never sent
to a worker that cannot start it, and none waits in a worker's thread. A claim bumps
``attempts``, which fences the commit: only the run that claimed the chunk last may commit
it, so a chunk run twice never adds an output line twice. The claimant renews the
chunk's lease for the whole life of the run (``Heartbeat``); the reaper puts a running
chunk back to pending only when that lease runs out (its worker died or froze).

A run whose parts cannot be written because the file store is full (``StorageFull``)
gives the chunk back with a pause (a pending chunk's ``lease_until`` is the time before
which nobody claims it): a full store is not the chunk's fault, so its attempts are spent
over minutes, time for an operator to free space, not in a burst. Its last attempt
fails the batch with a ``storage_full`` error instead of failing its lines.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, or_, select, update
from sqlalchemy.orm import Session

from configs import tracing
from configs.settings import Settings
from tasks.batches.leases import Heartbeat
from tasks.batches.leftovers import parts_dir
from tasks.batches.lines import Outcome, iter_requests, output_line, request_id
from tasks.batches.status import now, transition
from tasks.batches.usage import record_chunk_usage
from tasks.errors import LanewayError, StorageFull
from tasks.filestore import FileStore
from tasks.store.db import (
    database_unavailable,
    describe_unavailable,
    retry_unavailable,
    session_scope,
)
from tasks.store.models import BatchRow, ChunkRow, FileRow
from tasks.store.usage import Usage

log = logging.getLogger(__name__)
REQUESTS = logging.getLogger("laneway.requests")  # one line per request (JSON logs)

UNFINISHED = ("pending", "running")
FINISHED_CHUNK = ("done", "failed")  # committed, with results (failed: chunk_failed lines)
# pending chunks looked at per claim: a few, in case another worker takes the first
CLAIM_CANDIDATES = 8
# the first pause after a full file store stopped a write; it doubles with each attempt,
# up to LANEWAY_CHUNK_LEASE_S (the defaults: 15 s, 30 s, 60 s, 120 s, then the batch fails)
STORE_FULL_PAUSE_S = 15.0

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
                # not paused (store_full_pause)
                or_(ChunkRow.lease_until.is_(None), ChunkRow.lease_until <= t),
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


def release_chunk(claim: ChunkClaim, pause_s: float = 0.0) -> None:
    """Give a claimed chunk back (its run broke): a claim after ``pause_s`` retries it,
    and ``attempts`` keeps counting toward ``chunk_max_attempts``."""
    _while_owned(claim, state="pending", lease_until=now() + pause_s if pause_s else None)


def _give_back(claim: ChunkClaim, exc: Exception) -> None:
    """After a run broke: the chunk back to pending for the next claim, or, when the
    database cannot be told, to the reaper once the chunk's lease runs out."""
    if database_unavailable(exc):
        log.warning("%s: the database is unavailable (%s)", claim, describe_unavailable(exc))
    else:
        log.exception("%s failed; giving it back", claim)
    try:
        release_chunk(claim)
    except Exception as again:
        log.warning(
            "%s: not given back (%s); it runs again once its lease runs out",
            claim,
            describe_unavailable(again),
        )


def store_full_pause(attempt: int, settings: Settings) -> float:
    """How long work stopped by a full file store waits before its next attempt."""
    return min(settings.chunk_lease_s, STORE_FULL_PAUSE_S * 2.0 ** (attempt - 1))


def store_full_error(what: str, tries: int) -> dict[str, object]:
    """The batch error (``errors.data[]``) of a batch given up on a full file store."""
    return {
        "code": "storage_full",
        "line": None,
        "message": f"the file store is full: {what} could not be written after {tries} "
        "tries, so the batch is given up. Free space in the file store and submit it again",
        "param": None,
    }


def _store_full(claim: ChunkClaim, settings: Settings, exc: StorageFull) -> None:
    """The run's parts could not be written: pause the chunk, or, on its last attempt,
    fail its batch saying why (its lines would otherwise fail as ``chunk_failed``, and
    their error lines could not be written either)."""
    if claim.attempt < settings.chunk_max_attempts:
        pause = store_full_pause(claim.attempt, settings)
        log.warning(
            "%s: the file store is full (%s); runs again in %.0f s", claim, exc.__cause__, pause
        )
        release_chunk(claim, pause)
    elif _fail_batch(claim, store_full_error(f"the results of chunk {claim.index}", claim.attempt)):
        log.error(
            "%s: the file store is full (%s); batch %s failed", claim, exc.__cause__, claim.batch_id
        )
    else:  # the batch is being cancelled or expired: its finaliser decides
        release_chunk(claim)


def _fail_batch(claim: ChunkClaim, error: dict[str, object]) -> bool:
    """In one transaction, while this run owns the chunk and the batch is in progress:
    the batch ``failed`` with ``error``, its unfinished chunks cancelled (a run still at
    work cannot commit), the removal of its parts owed at once (``remove_owed``)."""
    with session_scope() as s:
        batch = s.get(BatchRow, claim.batch_id)
        if batch is None or batch.status != "in_progress":
            return False
        mine = s.execute(
            update(ChunkRow).where(*_owned(claim)).values(state="cancelled", lease_until=None)
        ).rowcount  # type: ignore[attr-defined]
        if mine != 1 or not transition(
            s,
            claim.batch_id,
            "failed",
            errors=[error],
            lease_token=uuid.uuid4().hex,
            lease_until=now(),
        ):
            s.rollback()
            return False
        s.execute(
            update(ChunkRow)
            .where(ChunkRow.batch_id == claim.batch_id, ChunkRow.state.in_(UNFINISHED))
            .values(state="cancelled", lease_until=None)
        )
    return True


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
    only if this run still owns the chunk. Safe to repeat: when a try's answer was lost
    (the database went away as it committed), the next finds it landed (``_landed``)."""
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
        else:
            return _landed(s, claim)
    return bool(committed == 1)


def _landed(s: Session, claim: ChunkClaim) -> bool:
    """Whether this run's commit is the chunk's: only that commit points the chunk at
    this run's parts (their key holds the attempt)."""
    key = s.scalar(select(ChunkRow.result_key).where(ChunkRow.id == claim.chunk_id))
    return key == claim.part_key


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
    committing = False
    try:
        with Heartbeat(
            lambda: renew_chunk(claim, settings), settings.chunk_lease_s / 3, str(claim)
        ):
            result = compute_chunk(claim, settings=settings, store=store, execute=execute)
            # the results are written: worth waiting for a database that went away
            committing = True
            committed = retry_unavailable(
                lambda: commit_chunk(claim, result, settings=settings), f"commit of {claim}"
            )
    except StorageFull as exc:  # not the chunk's fault: paused, not failed
        _store_full(claim, settings, exc)
        committed = False
    except Exception as exc:
        _give_back(claim, exc)
        if committing:  # the commit may have landed unanswered: its parts must stay (the
            return False  # finaliser removes every part its batch does not count)
        committed = False
    if not committed:  # another run owns this chunk now (or ours broke): ours never counted
        log.info("%s: not committed; discarding its results", claim)
        store.delete(claim.part_key + ".out")
        store.delete(claim.part_key + ".err")
    return committed
