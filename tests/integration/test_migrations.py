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
from sqlalchemy import inspect

from tasks.store.db import alembic_config, downgrade, make_engine, migrate
from tasks.store.models import Base
from tests.harness import TestDatabase

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

HEAD = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
MODEL_TABLES = set(Base.metadata.tables)


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
