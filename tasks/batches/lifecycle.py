"""The life of a batch after it is created: validation, the move to ``finalizing``, and
finalisation (the output and error files) into completed, cancelled or expired.

Validation and finalisation are jobs a worker claims with the batch's lease
(``claim_batch_job``) and holds with a heartbeat while it works. Each ends in one fenced
transaction: the rows it writes and the status move commit together, and only while the
job's token is still the batch's. A finaliser writes its files under names of its own
(``results/<batch>/<kind>-<token>``) and only its fenced commit points the File rows at
them, so a finaliser that lost its lease (it froze past ``chunk_lease_s`` and another
took over) can never replace a finished batch's output, and parts are deleted only by
the finaliser whose commit won (or, if it dies right after, by a reaper:
``tasks/batches/leftovers.py``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from configs.catalog import Catalog
from configs.settings import Settings
from tasks.access.quotas import lines_error, lines_in_flight, lock_owner
from tasks.batches import status
from tasks.batches.chunks import FINISHED_CHUNK, UNFINISHED, store_full_error, store_full_pause
from tasks.batches.leases import Heartbeat
from tasks.batches.leftovers import (
    CLEANUP_LEASE_S,
    parts_dir,
    release,
    remove_leftovers,
    results_dir,
)
from tasks.batches.lines import expired_line, iter_requests
from tasks.batches.status import now, transition
from tasks.batches.validation import ChunkSpec, Validation, validate_input
from tasks.errors import StorageFull
from tasks.filestore import FileStore
from tasks.store.db import describe_unavailable, retry_unavailable, session_scope
from tasks.store.files import put_output_file
from tasks.store.models import BatchRow, ChunkRow, FileRow

log = logging.getLogger(__name__)

# the status a batch job is claimed in -> where finalising it leads
FINALISE_TO = {"finalizing": "completed", "cancelling": "cancelled", "in_progress": "expired"}
CLAIM_CANDIDATES = 4


@dataclass(frozen=True)
class BatchJob:
    """A claimed validation (``status == "validating"``) or finalisation."""

    batch_id: str
    status: str
    token: str
    attempt: int = 1  # this claim's number since the batch's last status move
    # the W3C context of the request that made the batch: its spans' parent
    trace_context: dict[str, str] | None = field(default=None, compare=False)

    def __str__(self) -> str:
        what = "validation" if self.status == "validating" else "finalisation"
        return f"{what} of {self.batch_id}"


# -- cheap moves ------------------------------------------------------------------------------


def advance(batch_id: str | None = None) -> int:
    """The moves that need no claim, judged from the database alone, for one batch or
    every open one: in progress with every chunk done -> ``finalizing``; still
    validating past its window -> ``expired``. Returns how many batches moved.

    "Done" is done or failed (with results), never cancelled: a batch still in progress
    with a cancelled chunk is being expired right now (its finaliser stops the
    unfinished chunks first), and that finaliser, not this one, owns the batch."""
    t = now()
    not_done = select(ChunkRow.batch_id).where(ChunkRow.state.not_in(FINISHED_CHUNK))
    ready = select(BatchRow.id).where(
        BatchRow.status == "in_progress", BatchRow.id.not_in(not_done)
    )
    late = select(BatchRow.id).where(BatchRow.status == "validating", BatchRow.expires_at <= t)
    if batch_id is not None:
        ready, late = ready.where(BatchRow.id == batch_id), late.where(BatchRow.id == batch_id)
    moved = 0
    with session_scope() as s:
        for bid in s.scalars(ready).all():
            moved += transition(s, bid, "finalizing")
        for bid in s.scalars(late).all():
            moved += transition(s, bid, "expired")
    return moved


# -- claiming a job -----------------------------------------------------------------------------


def claim_batch_job(*, settings: Settings, capability: str) -> BatchJob | None:
    """The oldest batch of ``capability`` that needs a validator or a finaliser and has
    none (no lease, or a lapsed one), claimed; None when there is none."""
    t = now()
    running = select(ChunkRow.batch_id).where(ChunkRow.state == "running")
    needs_work = or_(
        and_(
            BatchRow.status == "validating",
            or_(BatchRow.expires_at.is_(None), BatchRow.expires_at > t),
        ),
        BatchRow.status == "finalizing",
        and_(BatchRow.status == "cancelling", BatchRow.id.not_in(running)),
        and_(BatchRow.status == "in_progress", BatchRow.expires_at <= t),
    )
    with session_scope() as s:
        rows = s.execute(
            select(BatchRow.id, BatchRow.status, BatchRow.trace_context)
            .where(
                BatchRow.capability == capability,
                or_(BatchRow.lease_until.is_(None), BatchRow.lease_until < t),
                needs_work,
            )
            .order_by(BatchRow.created_at, BatchRow.id)
            .limit(CLAIM_CANDIDATES)
        ).all()
    for batch_id, batch_status, trace_context in rows:
        with session_scope() as s:
            claimed = status.claim(s, batch_id, batch_status, settings.chunk_lease_s)
        if claimed is None:
            continue
        job = BatchJob(batch_id, batch_status, *claimed, trace_context=trace_context)
        if job.attempt <= settings.chunk_max_attempts:
            return job
        give_up(job)
    return None


def give_up(job: BatchJob, error: dict[str, Any] | None = None) -> bool:
    """The job broke on every try (each claim is counted in the database, so a worker
    that crashes outright counts too): the batch becomes ``failed`` with an error saying
    so (``error`` when the cause is known), instead of being claimed again for the rest
    of its window. The removal of what its chunks wrote is owed at once (the lapsed
    lease: ``leftovers.remove_owed``)."""
    tries = job.attempt - 1
    what = "validating its input file" if job.status == "validating" else "finalising it"
    error = error or {
        "code": "batch_job_failed",
        "line": None,
        "message": f"{what} failed {tries} times; the batch is given up (the workers' logs "
        f"have the cause under batch {job.batch_id})",
        "param": None,
    }
    with session_scope() as s:
        moved = transition(
            s,
            job.batch_id,
            "failed",
            fence=job.token,
            errors=[error],
            lease_token=job.token,
            lease_until=now(),
        )
    if moved:
        log.error("%s failed %d times: batch %s failed", job, tries, job.batch_id)
    return moved


def back_off(job: BatchJob, settings: Settings, pause: float | None = None) -> None:
    """A job that raised: its lease now runs out after a short pause that doubles with
    each attempt (a crash that repeats reaches ``give_up`` in about a minute, a passing
    fault is retried soon), instead of after the full lease."""
    if pause is None:
        pause = min(settings.chunk_lease_s, 2.0**job.attempt)
    with session_scope() as s:
        status.renew(s, job.batch_id, job.token, pause)


def store_full(job: BatchJob, settings: Settings, exc: StorageFull) -> None:
    """The job could not write its files: the file store is full. Nothing it wrote
    counted (``finalize`` removed it), and the batch's status is as it was, so it is
    never completed with a short output. Not the batch's fault: the next try waits
    longer than ``back_off``'s (``store_full_pause``), its attempts still counted; the
    last one fails the batch with an error that says the store is full."""
    if job.attempt < settings.chunk_max_attempts:
        pause = store_full_pause(job.attempt, settings)
        log.warning(
            "%s: the file store is full (%s); tried again in %.0f s", job, exc.__cause__, pause
        )
        back_off(job, settings, pause)
    elif give_up(job, store_full_error("the batch's output and error files", job.attempt)):
        log.error(
            "%s: the file store is full (%s); batch %s failed", job, exc.__cause__, job.batch_id
        )


def _heartbeat(job: BatchJob, settings: Settings) -> Heartbeat:
    def renew() -> bool:
        with session_scope() as s:
            return status.renew(s, job.batch_id, job.token, settings.chunk_lease_s)

    return Heartbeat(renew, settings.chunk_lease_s / 3, str(job))


# -- validation --------------------------------------------------------------------------------


def validate_batch(
    job: BatchJob, *, settings: Settings, catalog: Catalog, store: FileStore
) -> str | None:
    """validating -> in_progress (chunk rows recorded) or failed (errors listed); returns
    the new status, or None when the job was no longer ours (cancelled, expired, or
    taken over)."""
    with _heartbeat(job, settings):
        read = retry_unavailable(lambda: _batch_input(job), f"{job}: reading its batch")
        if read is None:
            return None
        endpoint, owner, lines_quota, key, size = read
        if key is not None:
            v = validate_input(
                settings=settings,
                catalog=catalog,
                store=store,
                storage_key=key,
                size=size,
                endpoint=endpoint,
            )
        else:
            v = Validation()
            v.error("file_not_found", None, "the input file was deleted before validation")
        return retry_unavailable(
            lambda: _record_once(job, v, owner, lines_quota), f"{job}: recording it"
        )


def _batch_input(job: BatchJob) -> tuple[str, str | None, int, str | None, int] | None:
    """The batch's endpoint, owner and lines quota, and its input file's storage key
    (None when the file was deleted) and size; None when the batch is gone."""
    with session_scope() as s:
        batch = s.get(BatchRow, job.batch_id)
        if batch is None:
            return None
        file_row = s.get(FileRow, batch.input_file_id)
        # also when deleted or expired for the API since the batch was created
        found = file_row is not None and not file_row.deleted
        key, size = (file_row.storage_key, file_row.bytes) if found and file_row else (None, 0)
        return batch.endpoint, batch.owner, batch.lines_quota, key, size


def _holds(s: Session, job: BatchJob, status_now: str | None = None) -> bool:
    """Whether the batch is in ``status_now`` (the job's own by default) under the job's
    token: the job still holds it, or (a finaliser's final status) its commit landed."""
    row = s.execute(
        select(BatchRow.status, BatchRow.lease_token).where(BatchRow.id == job.batch_id)
    ).first()
    return row is not None and tuple(row) == (status_now or job.status, job.token)


def _record_once(job: BatchJob, v: Validation, owner: str | None, lines_quota: int) -> str | None:
    """``_record_validation`` while the job still holds the batch: a try whose answer was
    lost (the database went away as it committed) may have moved it already."""
    with session_scope() as s:
        if not _holds(s, job):
            return None
        return _record_validation(s, job, v, owner, lines_quota)


def _record_validation(
    s: Session, job: BatchJob, v: Validation, owner: str | None, lines_quota: int
) -> str | None:
    """The validation's outcome, in one fenced transaction: the chunk rows and the move
    to ``in_progress`` (with the owner's lines in flight counted with this batch's, under
    the quota lock), or ``failed`` with the errors."""
    if not v.errors:
        if lines_quota:
            lock_owner(s, owner)
        s.add_all(_chunk_row(job.batch_id, i, spec) for i, spec in enumerate(v.chunks))
        s.flush()
        if not transition(
            s, job.batch_id, "in_progress", fence=job.token, model=v.model, request_total=v.total
        ):
            s.rollback()  # cancelled, expired or taken over meanwhile: no chunks wanted
            return None
        in_flight = lines_in_flight(s, owner) if lines_quota else 0  # this batch's included
        if in_flight <= lines_quota or not lines_quota:
            return "in_progress"
        s.rollback()  # over the owner's quota: nothing of it stays, the batch fails
        v.errors.append(lines_error(lines_quota, in_flight))
    moved = transition(
        s, job.batch_id, "failed", fence=job.token, errors=v.errors, request_total=v.total
    )
    return "failed" if moved else None


def _chunk_row(batch_id: str, index: int, spec: ChunkSpec) -> ChunkRow:
    return ChunkRow(
        batch_id=batch_id,
        index=index,
        line_start=spec.line_start,
        byte_start=spec.byte_start,
        byte_end=spec.byte_end,
        state="pending",
        attempts=0,
        completed=0,
        failed=0,
    )


# -- finalisation ------------------------------------------------------------------------------


@dataclass
class _Plan:
    """What a finaliser assembles: the committed chunks and, when expiring, the rest."""

    input_key: str
    expires_after_s: int | None
    owner: str | None
    done: list[ChunkRow] = field(default_factory=list)
    unfinished: list[ChunkRow] = field(default_factory=list)

    @property
    def completed(self) -> int:
        return sum(c.completed for c in self.done)

    @property
    def failed(self) -> int:
        return sum(c.failed for c in self.done)


def result_file_id(batch_id: str, kind: str) -> str:
    """The id of a batch's output or error file: the same for every finaliser."""
    return "file-" + hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()[:24]


def _plan(job: BatchJob, to: str) -> _Plan | None:
    """Read what to assemble; when expiring, first stop every unfinished chunk (fenced:
    None when the batch is no longer ours)."""
    with session_scope() as s:
        batch = s.get(BatchRow, job.batch_id)
        if batch is None or batch.lease_token != job.token:
            return None
        if to == "expired":
            s.execute(
                update(ChunkRow)
                .where(ChunkRow.batch_id == job.batch_id, ChunkRow.state.in_(UNFINISHED))
                .values(state="cancelled", lease_until=None)
            )
        input_row = s.get(FileRow, batch.input_file_id)
        seconds = (batch.output_expires_after or {}).get("seconds")
        plan = _Plan(
            input_key=input_row.storage_key if input_row is not None else "",
            expires_after_s=int(seconds) if seconds else None,
            owner=batch.owner,
        )
        for chunk in s.scalars(
            select(ChunkRow).where(ChunkRow.batch_id == job.batch_id).order_by(ChunkRow.index)
        ):
            finished = chunk.state in FINISHED_CHUNK and chunk.result_key
            (plan.done if finished else plan.unfinished).append(chunk)
            s.expunge(chunk)
    return plan


def _expired_lines(
    store: FileStore, job: BatchJob, plan: _Plan, count: list[int]
) -> Iterator[bytes]:
    """A ``batch_expired`` line for every request of an unfinished chunk, streamed from
    the input file (never all in memory)."""
    for chunk in plan.unfinished:
        requests = iter_requests(store, plan.input_key, chunk.byte_start, chunk.byte_end)
        for i, request in enumerate(requests):
            count[0] += 1
            yield expired_line(job.batch_id, chunk.line_start + i, request["custom_id"])


@dataclass
class _Written:
    """The files a finaliser wrote: (file id, storage key, size) by kind."""

    files: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    expired: int = 0

    def storage_keys(self) -> list[str]:
        return [key for _, key, _ in self.files.values()]


def _write_files(store: FileStore, job: BatchJob, to: str, plan: _Plan) -> _Written:
    written = _Written()

    def assemble(kind: str, parts: list[str]) -> None:
        file_id = result_file_id(job.batch_id, kind)
        key = f"{results_dir(job.batch_id)}/{kind}-{job.token[:16]}"
        written.files[kind] = (file_id, key, 0)  # recorded first: removed if concat fails
        written.files[kind] = (file_id, key, store.concat(key, parts))

    if plan.completed:
        assemble("output", [f"{c.result_key}.out" for c in plan.done])
    err_parts = [f"{c.result_key}.err" for c in plan.done]
    if to == "expired" and plan.unfinished:
        count = [0]
        expired_key = f"{parts_dir(job.batch_id)}/expired-{job.token[:16]}.err"
        store.write_lines(expired_key, _expired_lines(store, job, plan, count))
        written.expired = count[0]
        err_parts.append(expired_key)
    if plan.failed or written.expired:
        assemble("error", err_parts)
    return written


def _commit_finalisation(
    job: BatchJob, to: str, plan: _Plan, written: _Written
) -> list[str] | None:
    """Point the File rows at the new files and move the batch, in one fenced
    transaction; returns the storage keys the rows pointed at before (to delete), or None
    when the batch was no longer ours. Safe to repeat: a try whose answer was lost is
    found landed (what it superseded then goes with the batch's other leftovers)."""
    superseded: list[str] = []
    with session_scope() as s:
        if _holds(s, job, to):
            return superseded
        for kind, (file_id, key, size) in written.files.items():
            old = put_output_file(
                s,
                file_id=file_id,
                key=key,
                filename=f"{job.batch_id}_{kind}.jsonl",
                size=size,
                expires_after_s=plan.expires_after_s,
                owner=plan.owner,
            )
            if old is not None and old != key:
                superseded.append(old)
        moved = transition(
            s,
            job.batch_id,
            to,
            fence=job.token,
            output_file_id=written.files.get("output", (None,))[0],
            error_file_id=written.files.get("error", (None,))[0],
            request_completed=plan.completed,
            request_failed=plan.failed + written.expired,
            # held on: the removal of the parts is owed (tasks/batches/leftovers.py)
            lease_token=job.token,
            lease_until=now() + CLEANUP_LEASE_S,
        )
        if not moved:
            s.rollback()
            return None
    return superseded


def finalize(job: BatchJob, *, store: FileStore, settings: Settings) -> bool:
    """Write the output and error files from the committed chunks, then move the batch to
    completed, cancelled or expired; returns whether this finaliser's commit won."""
    to = FINALISE_TO[job.status]
    written = _Written()
    plan: _Plan | None = None
    superseded: list[str] | None = None
    committing = False
    try:
        with _heartbeat(job, settings) as beat:
            plan = retry_unavailable(lambda: _plan(job, to), f"{job}: reading its chunks")
            if plan is not None:
                written = _write_files(store, job, to, plan)
                if not beat.lost:
                    committing = True  # until it answers, the commit may have landed
                    commit = partial(_commit_finalisation, job, to, plan, written)
                    superseded = retry_unavailable(commit, f"{job}: committing it")
                    committing = False
    finally:
        # lost, taken over or broken: what we wrote never counted (unless a commit that
        # never answered landed: then the next finaliser's cleanup removes it)
        if superseded is None and not committing:
            for key in written.storage_keys():
                store.delete(key)
    if superseded is None or plan is None:
        log.warning("%s: the batch was no longer ours; nothing written", job)
        return False
    for key in superseded:
        store.delete(key)
    remove_leftovers(store, job.batch_id, keep=written.storage_keys())
    try:
        release(job.batch_id, job.token)
    except Exception as exc:  # the cleanup is done; a reaper will only redo it
        log.warning("%s: cleanup lease not released (%s)", job, describe_unavailable(exc))
    log.info(
        "batch %s %s: %d completed, %d failed",
        job.batch_id,
        to,
        plan.completed,
        plan.failed + written.expired,
    )
    return True
