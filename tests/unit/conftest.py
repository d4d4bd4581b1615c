"""Fixtures the unit tests share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import sessionmaker

import tasks.store.db
from tasks.store.db import make_engine
from tasks.store.models import Base


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``tasks.store.db.session_scope`` bound to a fresh SQLite file with every table."""
    engine = make_engine(f"sqlite:///{tmp_path / 'unit.db'}")
    Base.metadata.create_all(engine)
    monkeypatch.setattr(tasks.store.db, "_engine", engine)
    monkeypatch.setattr(tasks.store.db, "_sessions", sessionmaker(engine, expire_on_commit=False))
    try:
        yield
    finally:
        engine.dispose()
