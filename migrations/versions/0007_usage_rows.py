"""usage as rows of (chunk, unit, amount): a new unit needs no migration

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 09:00:00

Chunks and batches had one usage column per unit (prompt and completion tokens, seconds
of audio), so every new unit was a migration, and batches reported only the tokens. Now
``batch_usage`` holds one row per committed chunk and unit, inserted by the chunk's fenced
commit, and a batch's usage is their sum by unit (``tasks/batches/usage.py``). The
chunks' columns are copied into it (each batch's columns were the sum of its chunks'),
then both tables' columns are dropped. A downgrade puts the three columns back, summed
from the rows; units other than those three are lost.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# the columns 0001 and 0003 made: (name, type, whether a count; else a measure)
COLUMNS = (
    ("prompt_tokens", sa.BigInteger(), True),
    ("completion_tokens", sa.BigInteger(), True),
    ("audio_seconds", sa.Float(), False),
)
TABLES = ("batches", "batch_chunks")

usage = sa.table(
    "batch_usage",
    sa.column("batch_id", sa.String),
    sa.column("chunk_index", sa.Integer),
    sa.column("unit", sa.String),
    sa.column("count", sa.BigInteger),
    sa.column("measure", sa.Float),
)


def _chunks(*names: str) -> sa.TableClause:
    return sa.table(
        "batch_chunks",
        sa.column("batch_id", sa.String),
        sa.column("index", sa.Integer),
        *[sa.column(n) for n in names],
    )


def upgrade() -> None:
    op.create_table(
        "batch_usage",
        sa.Column(
            "batch_id",
            sa.String(64),
            sa.ForeignKey("batches.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("chunk_index", sa.Integer(), primary_key=True),
        sa.Column("unit", sa.String(64), primary_key=True),
        sa.Column("count", sa.BigInteger(), nullable=True),
        sa.Column("measure", sa.Float(), nullable=True),
    )
    chunks = _chunks(*(name for name, _, _ in COLUMNS))
    for name, _, counted in COLUMNS:
        amount = chunks.c[name]
        op.execute(
            usage.insert().from_select(
                ["batch_id", "chunk_index", "unit", "count", "measure"],
                sa.select(
                    chunks.c.batch_id,
                    chunks.c["index"],
                    sa.literal(name, sa.String),
                    amount if counted else sa.null(),
                    sa.null() if counted else amount,
                ).where(amount.is_not(None), amount != 0),
            )
        )
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            for name, _, _ in reversed(COLUMNS):
                batch.drop_column(name)


def _summed(name: str, *where: sa.ColumnElement[bool]) -> sa.ScalarSelect[object]:
    amount = sa.func.coalesce(usage.c.measure, usage.c["count"])
    return (
        sa.select(sa.func.coalesce(sa.func.sum(amount), 0))
        .where(usage.c.unit == name, *where)
        .scalar_subquery()
    )


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            for name, kind, _ in COLUMNS:
                batch.add_column(sa.Column(name, kind, nullable=False, server_default="0"))
    chunks = _chunks(*(name for name, _, _ in COLUMNS))
    batches = sa.table("batches", sa.column("id"), *[sa.column(n) for n, _, _ in COLUMNS])
    op.execute(
        chunks.update().values(
            {
                name: _summed(
                    name,
                    usage.c.batch_id == chunks.c.batch_id,
                    usage.c.chunk_index == chunks.c["index"],
                )
                for name, _, _ in COLUMNS
            }
        )
    )
    op.execute(
        batches.update().values(
            {name: _summed(name, usage.c.batch_id == batches.c.id) for name, _, _ in COLUMNS}
        )
    )
    # 0001 gave prompt_tokens no server default
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.alter_column("prompt_tokens", server_default=None)
    op.drop_table("batch_usage")
