"""Alembic migrations (run by ``laneway migrate`` and at start-up)."""
