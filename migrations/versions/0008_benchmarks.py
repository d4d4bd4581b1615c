"""benchmark records, and the trace context a batch was made in

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 09:00:00

``benchmark_records`` holds measured speeds per model: the rows of ``laneway benchmark``
runs and the rolling rows workers fold their forwards' rates into
(``tasks/benchmarks/``); ``/v1/benchmarks`` reads them and batch estimates are made
from them. ``batches.trace_context`` keeps the W3C trace context of the request that
made a batch, so that its lines join that trace (``configs/tracing.py``).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "benchmark_records",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("run_id", sa.String(40), nullable=False),
        sa.Column("rolling_key", sa.String(64), nullable=True),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("capability", sa.String(32), nullable=False),
        sa.Column("engine", sa.String(64), nullable=False),
        sa.Column("device", sa.String(64), nullable=False),
        sa.Column("workers", sa.Integer(), nullable=False),
        sa.Column("context_length", sa.Integer(), nullable=True),
        sa.Column("input_tokens", sa.Float(), nullable=True),
        sa.Column("output_tokens", sa.Float(), nullable=True),
        sa.Column("concurrency", sa.Integer(), nullable=True),
        sa.Column("batch_size", sa.Float(), nullable=True),
        sa.Column("requests_per_s", sa.Float(), nullable=True),
        sa.Column("units_per_s", sa.Float(), nullable=True),
        sa.Column("unit", sa.String(32), nullable=True),
        sa.Column("latency_p50_s", sa.Float(), nullable=True),
        sa.Column("latency_p95_s", sa.Float(), nullable=True),
        sa.Column("ttft_p50_s", sa.Float(), nullable=True),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("success_rate", sa.Float(), nullable=True),
        sa.Column("sample_response", sa.Text(), nullable=True),
        sa.Column("version", sa.String(32), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.UniqueConstraint("rolling_key"),
    )
    op.create_index("ix_benchmark_records_run_id", "benchmark_records", ["run_id"])
    op.create_index("ix_benchmark_model_created", "benchmark_records", ["model", "created_at"])
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("trace_context", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("trace_context")
    op.drop_index("ix_benchmark_model_created", table_name="benchmark_records")
    op.drop_index("ix_benchmark_records_run_id", table_name="benchmark_records")
    op.drop_table("benchmark_records")
