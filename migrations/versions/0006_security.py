"""Bounded batch jobs, per-key quotas, idempotency keys scoped for every owner

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 09:00:00

- ``batches.job_attempts`` counts the claims of a batch's validation or finalisation
  since its last status move, so a job that crashes on every try fails the batch after
  ``LANEWAY_CHUNK_MAX_ATTEMPTS`` instead of being claimed again for 24 hours.
- ``api_keys`` gains per-key quota overrides (stored bytes, files, open batches, batch
  lines in flight); NULL takes the settings' defaults. ``batches.lines_quota`` keeps the
  creating key's quota of lines in flight for the validation that counts them.
- ``Idempotency-Key`` values of the owner with no key (NULL) were stored as the client
  sent them, so such a client could send the stored (digested) form of a named owner's
  key and get that owner's object back. They are now digested like every owner's
  (``tasks.access.tenancy.scoped_idempotency_key``); this rewrites the ones already stored.
"""

from __future__ import annotations

import hashlib

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

QUOTAS = (
    ("max_stored_bytes", sa.BigInteger()),
    ("max_files", sa.Integer()),
    ("max_open_batches", sa.Integer()),
    ("max_batch_lines", sa.Integer()),
)
# the prefix tasks.access.tenancy gives the NULL owner's keys (the migration keeps its own copy:
# a migration must not change when the code does)
ANONYMOUS = "anon:"


def _rescope(table: str) -> None:
    t = sa.table(
        table,
        sa.column("id", sa.String),
        sa.column("owner", sa.String),
        sa.column("idempotency_key", sa.String),
    )
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(t.c.id, t.c.idempotency_key).where(
            t.c.owner.is_(None), t.c.idempotency_key.is_not(None)
        )
    ).all()
    for row_id, key in rows:
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
        bind.execute(
            sa.update(t).where(t.c.id == row_id).values(idempotency_key=ANONYMOUS + digest)
        )


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(
            sa.Column("job_attempts", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(
            sa.Column("lines_quota", sa.BigInteger(), nullable=False, server_default="0")
        )
    with op.batch_alter_table("api_keys") as batch:
        for name, kind in QUOTAS:
            batch.add_column(sa.Column(name, kind, nullable=True))
    for table in ("files", "batches"):
        _rescope(table)


def downgrade() -> None:
    # the NULL owner's keys stay digested: a retried create after a downgrade makes a new
    # object, which is what a lost idempotency key does anyway
    with op.batch_alter_table("api_keys") as batch:
        for name, _ in reversed(QUOTAS):
            batch.drop_column(name)
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("lines_quota")
        batch.drop_column("job_attempts")
