"""An index on batches.lease_until

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 01:30:00

A finished batch keeps its lease until its finaliser has removed the chunk parts
(tasks/batches/leftovers.py); every reaper pass looks for finished batches whose lease
ran out. The index keeps that a short range scan over the few rows with a lease, not a
scan of every finished batch.
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.create_index("ix_batches_lease_until", ["lease_until"])


def downgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.drop_index("ix_batches_lease_until")
