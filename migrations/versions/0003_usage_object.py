"""usage as an object: completion tokens and seconds of audio beside prompt tokens

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03 11:40:00

Batch API usage was prompt tokens only. Chat lines produce completion tokens and speech
lines seconds of audio, so chunks and batches count both (``tasks/store/usage.py``).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TABLES = ("batches", "batch_chunks")


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(
                sa.Column("completion_tokens", sa.BigInteger(), nullable=False, server_default="0")
            )
            batch.add_column(
                sa.Column("audio_seconds", sa.Float(), nullable=False, server_default="0")
            )


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("audio_seconds")
            batch.drop_column("completion_tokens")
