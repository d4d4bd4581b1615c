"""Job state: files, batches and their chunks (results live in the file store)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class FileRow(Base):
    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32), index=True)
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[int] = mapped_column(BigInteger, index=True)
    expires_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="processed")
    storage_key: Mapped[str] = mapped_column(String(256))
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    idempotency_key: Mapped[str | None] = mapped_column(String(256), nullable=True, unique=True)
    # the key owner it belongs to (tasks/access/tenancy.py); None: made with no keys configured
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)


class BatchRow(Base):
    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    endpoint: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str] = mapped_column(String(64))
    completion_window: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), index=True)
    model: Mapped[str | None] = mapped_column(String(256), nullable=True)
    capability: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger, index=True)
    expires_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    in_progress_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    finalizing_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    completed_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    failed_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    expired_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    cancelling_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    cancelled_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    output_file_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_file_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    request_total: Mapped[int] = mapped_column(Integer, default=0)
    request_completed: Mapped[int] = mapped_column(Integer, default=0)
    request_failed: Mapped[int] = mapped_column(Integer, default=0)
    # its usage: the sum of its chunks' rows in batch_usage (UsageRow)
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON, nullable=True)
    errors: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)
    output_expires_after: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(256), nullable=True, unique=True)
    # claim on validation / finalisation work: whoever holds ``lease_token`` renews
    # ``lease_until`` while it works; a claimant whose lease ran out is replaced, and every
    # write it would still make is fenced by the token (see tasks/batches/status.py)
    # (a finished batch keeps its finaliser's lease until the chunk parts are removed:
    # tasks/batches/leftovers.py)
    lease_until: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)
    lease_token: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # claims of the work the batch's status needs (validation, finalisation, cleanup) since
    # its last status move: past LANEWAY_CHUNK_MAX_ATTEMPTS the batch fails instead of
    # being claimed again (tasks/batches/lifecycle.py)
    job_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # the creating key's quota of batch lines in flight (0: none), checked by validation
    # once it has counted this batch's lines (tasks/access/quotas.py)
    lines_quota: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    # the W3C trace context of the request that made it (configs/tracing.py), so that its
    # validation, chunks and lines join that trace; None when tracing was off
    trace_context: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True)


class ChunkRow(Base):
    __tablename__ = "batch_chunks"
    __table_args__ = (
        UniqueConstraint("batch_id", "index", name="uq_chunk_batch_index"),
        Index("ix_chunk_state_lease", "state", "lease_until"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    line_start: Mapped[int] = mapped_column(Integer)
    byte_start: Mapped[int] = mapped_column(BigInteger)
    byte_end: Mapped[int] = mapped_column(BigInteger)
    # pending -> running -> done | failed; cancelled (see tasks/batches/chunks.py)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    # claims so far; also the fencing token of the current run
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # running: when its lease runs out (its holder renews it while it works)
    lease_until: Mapped[float | None] = mapped_column(Float, nullable=True)
    result_key: Mapped[str | None] = mapped_column(String(256), nullable=True)
    completed: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    # its usage: its rows in batch_usage (UsageRow), written by its commit


class UsageRow(Base):
    """What one committed chunk used of one unit (tasks/store/usage.py); a batch's usage is
    the sum of its rows by unit (tasks/batches/usage.py). Rows, not a column per unit: a
    new unit needs no migration, and a chunk's commit only inserts its own rows, so
    concurrent commits never update a shared row."""

    __tablename__ = "batch_usage"

    batch_id: Mapped[str] = mapped_column(
        ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True
    )
    chunk_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    unit: Mapped[str] = mapped_column(String(64), primary_key=True)
    # the amount: a count (int) or a measure (float), the other NULL
    count: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    measure: Mapped[float | None] = mapped_column(Float, nullable=True)


class ApiKeyRow(Base):
    """A key made by `laneway keys create`: only its SHA-256 is kept (tasks/access/keys.py)."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # the key's first characters, to tell keys apart in `laneway keys list`
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # per-key limits; None: the settings' defaults
    rpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # per-key quotas (tasks/access/quotas.py); None: the settings' defaults
    max_stored_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    max_files: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_open_batches: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_batch_lines: Mapped[int | None] = mapped_column(Integer, nullable=True)


class BenchmarkRow(Base):
    """A measured speed of one model (tasks/benchmarks/records.py): a row of a
    ``laneway benchmark`` run (one per concurrency of its sweep), or a worker's rolling
    record, which its heartbeat folds its forwards' rates into (one row per model, engine
    and device: ``rolling_key``)."""

    __tablename__ = "benchmark_records"
    __table_args__ = (Index("ix_benchmark_model_created", "model", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # "benchmark" (a CLI run) or "rolling" (workers' heartbeats)
    source: Mapped[str] = mapped_column(String(16))
    # the rows of one CLI run share it; a rolling row's is "rolling"
    run_id: Mapped[str] = mapped_column(String(40), index=True)
    # rolling rows only: what they are unique by (a hash of model, engine and device)
    rolling_key: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True)
    model: Mapped[str] = mapped_column(String(256))
    capability: Mapped[str] = mapped_column(String(32))
    engine: Mapped[str] = mapped_column(String(64))
    device: Mapped[str] = mapped_column(String(64))
    workers: Mapped[int] = mapped_column(Integer)
    # the model's context window in tokens, where it has one
    context_length: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # what each request held: input tokens (text) and output tokens asked for (chat)
    input_tokens: Mapped[float | None] = mapped_column(Float, nullable=True)
    output_tokens: Mapped[float | None] = mapped_column(Float, nullable=True)
    concurrency: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # requests per forward pass, from the workers' metrics over the run
    batch_size: Mapped[float | None] = mapped_column(Float, nullable=True)
    requests_per_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    # ``unit`` per second: tokens of input (embeddings, rerank, classify), completion
    # tokens (chat), seconds of audio (speech)
    units_per_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    unit: Mapped[str | None] = mapped_column(String(32), nullable=True)
    latency_p50_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    latency_p95_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    ttft_p50_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    requests: Mapped[int] = mapped_column(Integer, default=0)
    success_rate: Mapped[float | None] = mapped_column(Float, nullable=True)
    sample_response: Mapped[str | None] = mapped_column(Text, nullable=True)
    version: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[int] = mapped_column(BigInteger)
    # a rolling row's last fold (a benchmark row's equals created_at)
    updated_at: Mapped[int] = mapped_column(BigInteger)
