"""Alembic migrations on SQLite and (with LANEWAY_TEST_DATABASE_URL) Postgres, and the
`laneway migrate` command."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import func, inspect, select, text
from sqlalchemy.orm import Session

from tasks.batches.usage import batch_usages
from tasks.store.db import alembic_config, downgrade, make_engine, migrate
from tasks.store.models import Base, ChunkRow, UsageRow
from tasks.store.usage import Usage
from tests.harness import TestDatabase

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

HEAD = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
MODEL_TABLES = set(Base.metadata.tables)
TABLES = ("batches", "batch_chunks")


@pytest.fixture(params=["sqlite", "postgres"])
def database(
    request: pytest.FixtureRequest, tmp_path: Path, postgres_server_url: str | None
) -> Iterator[TestDatabase]:
    if request.param == "postgres":
        if not postgres_server_url:
            pytest.skip("set LANEWAY_TEST_DATABASE_URL to a Postgres server to run this")
        db = TestDatabase(tmp_path, postgres_server_url)
    else:
        db = TestDatabase(tmp_path)
    try:
        yield db
    finally:
        db.drop()


def tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def revision(url: str) -> str | None:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def test_upgrade_to_head_then_downgrade_to_base(database: TestDatabase) -> None:
    assert MODEL_TABLES, "tasks.store.models declares no tables"
    migrate(database.url)
    assert revision(database.url) == HEAD
    assert tables(database.url) == MODEL_TABLES | {"alembic_version"}
    migrate(database.url)  # a second run is a no-op
    assert revision(database.url) == HEAD
    downgrade(database.url, "base")
    assert revision(database.url) is None
    assert tables(database.url) - {"alembic_version"} == set()
    migrate(database.url)  # and back up again
    assert tables(database.url) == MODEL_TABLES | {"alembic_version"}


def test_every_revision_steps_down_and_up(database: TestDatabase) -> None:
    script = ScriptDirectory.from_config(alembic_config(database.url))
    revisions = [r.revision for r in script.walk_revisions("base", "heads")]  # newest first
    migrate(database.url)
    for rev in revisions:
        downgrade(database.url, "-1")
        migrate(database.url, rev)
        downgrade(database.url, "-1")
    assert revision(database.url) is None
    migrate(database.url)
    assert revision(database.url) == HEAD


def test_migrations_match_the_models(database: TestDatabase) -> None:
    """Autogenerate finds nothing to add: the migrations build what tasks.store.models declares."""
    migrate(database.url)
    engine = make_engine(database.url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()
    assert diff == []


def run_cli(env_overrides: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LANEWAY_")}
    env.update(env_overrides)
    return subprocess.run(
        [sys.executable, "-m", "laneway", "migrate"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_laneway_migrate_cli(database: TestDatabase, tmp_path: Path) -> None:
    for _ in range(2):  # idempotent
        done = run_cli({"LANEWAY_DATABASE_URL": database.url}, tmp_path)
        assert done.returncode == 0, done.stderr
        assert "latest revision" in done.stderr
    assert revision(database.url) == HEAD
    assert tables(database.url) == MODEL_TABLES | {"alembic_version"}


def test_laneway_migrate_cli_defaults_to_sqlite_in_the_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    done = run_cli({"LANEWAY_DATA_DIR": str(data_dir)}, tmp_path)
    assert done.returncode == 0, done.stderr
    db_file = data_dir / "laneway.db"
    assert db_file.is_file()
    assert revision(f"sqlite:///{db_file}") == HEAD


def test_laneway_migrate_cli_reports_a_bad_url(tmp_path: Path) -> None:
    done = run_cli({"LANEWAY_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}, tmp_path)
    assert done.returncode != 0


def _insert_at_0006(url: str) -> None:
    """Two batches of 0006's schema: usage in a column per unit, on chunks and batches."""
    engine = make_engine(url)
    batch = {
        "endpoint": "/v1/x",
        "input_file_id": "file-in",
        "completion_window": "24h",
        "status": "completed",
        "created_at": 1,
        "request_total": 3,
        "request_completed": 3,
        "request_failed": 0,
    }
    chunk = {"line_start": 0, "byte_start": 0, "byte_end": 1, "state": "done", "attempts": 1}
    chunk.update(completed=1, failed=0)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO batches (id, endpoint, input_file_id, completion_window, status,"
                    " created_at, request_total, request_completed, request_failed,"
                    " prompt_tokens, completion_tokens, audio_seconds) VALUES (:id, :endpoint,"
                    " :input_file_id, :completion_window, :status, :created_at, :request_total,"
                    " :request_completed, :request_failed, :p, :c, :a)"
                ),
                [
                    {**batch, "id": "batch_tokens", "p": 12, "c": 5, "a": 0.0},
                    {**batch, "id": "batch_seconds", "p": 0, "c": 0, "a": 4.75},
                ],
            )
            conn.execute(
                text(
                    'INSERT INTO batch_chunks (batch_id, "index", line_start, byte_start,'
                    " byte_end, state, attempts, completed, failed, prompt_tokens,"
                    " completion_tokens, audio_seconds) VALUES (:b, :i, :line_start,"
                    " :byte_start, :byte_end, :state, :attempts, :completed, :failed, :p, :c, :a)"
                ),
                [
                    {**chunk, "b": "batch_tokens", "i": 0, "p": 7, "c": 5, "a": 0.0},
                    {**chunk, "b": "batch_tokens", "i": 1, "p": 5, "c": 0, "a": 0.0},
                    {**chunk, "b": "batch_seconds", "i": 0, "p": 0, "c": 0, "a": 1.5},
                    {**chunk, "b": "batch_seconds", "i": 1, "p": 0, "c": 0, "a": 3.25},
                ],
            )
    finally:
        engine.dispose()


def test_0007_moves_the_usage_columns_into_rows_and_back(database: TestDatabase) -> None:
    migrate(database.url, "0006")
    _insert_at_0006(database.url)
    migrate(database.url, "0007")
    engine = make_engine(database.url)
    try:
        columns = {t: {c["name"] for c in inspect(engine).get_columns(t)} for t in TABLES}
        assert not any({"prompt_tokens", "audio_seconds"} & names for names in columns.values())
        with Session(engine) as s:
            assert s.scalar(select(func.count()).select_from(ChunkRow)) == 4  # all kept
            usages = batch_usages(s, ["batch_tokens", "batch_seconds"])
            rows = s.execute(
                select(UsageRow.batch_id, UsageRow.chunk_index, UsageRow.unit).order_by(
                    UsageRow.batch_id, UsageRow.chunk_index, UsageRow.unit
                )
            ).all()
    finally:
        engine.dispose()
    assert usages["batch_tokens"] == Usage(prompt_tokens=12, completion_tokens=5)
    assert usages["batch_seconds"] == Usage(audio_seconds=4.75)
    assert isinstance(usages["batch_tokens"]["prompt_tokens"], int)
    assert [tuple(r) for r in rows] == [  # one row per chunk and unit used (no zeros)
        ("batch_seconds", 0, "audio_seconds"),
        ("batch_seconds", 1, "audio_seconds"),
        ("batch_tokens", 0, "completion_tokens"),
        ("batch_tokens", 0, "prompt_tokens"),
        ("batch_tokens", 1, "prompt_tokens"),
    ]

    downgrade(database.url, "0006")
    engine = make_engine(database.url)
    try:
        with engine.connect() as conn:
            batches = conn.execute(
                text("SELECT id, prompt_tokens, completion_tokens, audio_seconds FROM batches")
            ).all()
            chunks = conn.execute(
                text(
                    'SELECT batch_id, "index", prompt_tokens, completion_tokens, audio_seconds'
                    " FROM batch_chunks"
                )
            ).all()
    finally:
        engine.dispose()
    assert sorted(tuple(r) for r in batches) == [
        ("batch_seconds", 0, 0, 4.75),
        ("batch_tokens", 12, 5, 0.0),
    ]
    assert sorted(tuple(r) for r in chunks) == [
        ("batch_seconds", 0, 0, 0, 1.5),
        ("batch_seconds", 1, 0, 0, 3.25),
        ("batch_tokens", 0, 7, 5, 0.0),
        ("batch_tokens", 1, 5, 0, 0.0),
    ]
