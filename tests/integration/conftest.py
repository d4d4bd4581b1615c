"""Clients for the module's own ``stack`` fixture (every integration module defines one).

A module that needs a different client (retries, a fresh one per test) overrides these.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine

from tests.harness import Stack
from tests.integration.batch_support import db_engine
from tests.s3_server import MotoServer


@pytest.fixture(scope="module")
def client(stack: Stack) -> Any:
    """The official openai client, without retries so a failure shows as it is."""
    return stack.openai_client(max_retries=0)


@pytest.fixture(scope="module")
def http(stack: Stack) -> Iterator[httpx.Client]:
    with stack.http() as c:
        yield c


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """A real S3 endpoint (moto's server in its own process) for the file store tests."""
    server = MotoServer(tmp_path_factory.mktemp("moto")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def engine(stack: Stack) -> Iterator[Engine]:
    """An engine on the module's stack's database, to read what the API does not show."""
    engine = db_engine(stack)
    try:
        yield engine
    finally:
        engine.dispose()
