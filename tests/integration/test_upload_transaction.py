"""An upload holds no database transaction open while its bytes are copied (Postgres).

Postgres shows a session as 'idle in transaction' while its open transaction waits on
something else. With the copy inside the transaction, an upload carrying an
Idempotency-Key (the first query it makes looks the key up) held one open for as long
as the copy took: up to 512 MB, a connection and its snapshot pinned per upload. Here a
200 MB upload is watched from pg_stat_activity; any session idle in a transaction for
longer than a short statement gap is reported. SQLite has no such view: the module runs
in CI's Postgres pass.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Stack
from tests.integration.batch_support import fake_stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

UPLOAD_BYTES = 200 * 1024 * 1024
GAP_MS = 50  # longer than any gap between the statements of a short transaction


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, postgres_server_url: str | None
) -> Iterator[Stack]:
    if not postgres_server_url:
        pytest.skip("set LANEWAY_TEST_DATABASE_URL to a Postgres server to run this")
    stack = fake_stack(tmp_path_factory.mktemp("upload-tx-stack"), entries=[], env={})
    try:
        yield stack
    finally:
        stack.close()


def test_no_transaction_stays_open_while_an_upload_is_copied(stack: Stack, tmp_path: Path) -> None:
    import psycopg

    source = tmp_path / "upload.bin"
    with source.open("wb") as f:
        f.truncate(UPLOAD_BYTES)  # sparse: costs no disk until it is copied
    seen: list[tuple[str, float]] = []
    stop = threading.Event()

    def watch() -> None:
        with psycopg.connect(stack.database_url, autocommit=True) as conn:
            while not stop.is_set():
                seen.extend(
                    conn.execute(
                        "SELECT coalesce(query, ''), "
                        "extract(epoch FROM now() - state_change) * 1000 "
                        "FROM pg_stat_activity WHERE datname = current_database() "
                        "AND pid <> pg_backend_pid() AND state = 'idle in transaction' "
                        f"AND now() - state_change > interval '{GAP_MS} milliseconds'"
                    ).fetchall()
                )
                time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with stack.http(timeout=120) as http, source.open("rb") as f:
            response = http.post(
                "/v1/files",
                data={"purpose": "user_data"},
                files={"file": ("big.bin", f)},
                headers={"Idempotency-Key": f"no-open-transaction-{time.time()}"},
            )
            assert response.status_code == 200, response.text
            assert response.json()["bytes"] == UPLOAD_BYTES
            http.delete(f"/v1/files/{response.json()['id']}")
    finally:
        stop.set()
        watcher.join(5)
    assert seen == [], f"sessions idle in transaction during the upload: {seen[:3]}"
