"""fenced batch leases; chunks are claimed from the database; dead columns go

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 08:00:00

- ``batches.lease_token``: whoever validates or finalises a batch holds a token; its
  renewals and its final commit are fenced by it, so a finaliser that lost its lease can
  never write.
- Chunks are claimed by workers straight from the database (``pending -> running``); the
  ``queued`` state of the message-per-chunk design goes (queued chunks become pending).
- ``files.lines`` and ``batch_chunks.line_end`` were never read.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("lease_token", sa.String(length=32), nullable=True))
    with op.batch_alter_table("batch_chunks") as batch:
        batch.drop_column("line_end")
    with op.batch_alter_table("files") as batch:
        batch.drop_column("lines")
    op.execute(
        "UPDATE batch_chunks SET state = 'pending', lease_until = NULL WHERE state = 'queued'"
    )


def downgrade() -> None:
    with op.batch_alter_table("files") as batch:
        batch.add_column(sa.Column("lines", sa.Integer(), nullable=True))
    with op.batch_alter_table("batch_chunks") as batch:
        # the old code never read it; line_start is the best value an old row can get
        batch.add_column(sa.Column("line_end", sa.Integer(), nullable=False, server_default="0"))
    op.execute("UPDATE batch_chunks SET line_end = line_start")
    with op.batch_alter_table("batch_chunks") as batch:
        batch.alter_column("line_end", server_default=None)
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("lease_token")
