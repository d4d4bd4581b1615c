"""Batch rows, input files and settings for the tests that run the batch engine
in-process: tests/unit/test_batch_logic.py (SQLite) and
tests/integration/test_batch_engine.py (SQLite or Postgres). The caller binds
``tasks.store.db`` to its database first; the ``store`` and ``catalog`` fixtures are in
tests/conftest.py."""

from __future__ import annotations

import io
import json
from typing import Any

from sqlalchemy import select

from configs.settings import Settings
from tasks.batches.service import create_batch
from tasks.filestore import FileStore
from tasks.store.db import session_scope
from tasks.store.files import create_file
from tasks.store.models import BatchRow, ChunkRow

FAKE = "laneway/fake-embeddings"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
ENDPOINT = "/v1/embeddings"


def make_settings(**kw: Any) -> Settings:
    values: dict[str, Any] = {"models": [FAKE, MINILM], "chunk_lines": 3}
    values.update(kw)
    return Settings(**values)


def line(custom_id: Any, text: str = "hello", *, model: str = FAKE, **over: Any) -> bytes:
    obj: dict[str, Any] = {
        "custom_id": custom_id,
        "method": "POST",
        "url": ENDPOINT,
        "body": {"model": model, "input": text},
    }
    obj.update(over)
    return json.dumps(obj).encode() + b"\n"


def jsonl(n: int, *, fail: set[int] | None = None) -> bytes:
    fail = fail or set()
    return b"".join(line(f"req-{i}", "FAIL" if i in fail else f"text {i}") for i in range(n))


def upload(store: FileStore, content: bytes, *, purpose: str = "batch") -> str:
    row = create_file(
        store=store,
        source=io.BytesIO(content),
        filename="in.jsonl",
        purpose=purpose,
        max_bytes=10**9,
    )
    return str(row["id"])


def new_batch(settings: Settings, store: FileStore, content: bytes, **kw: Any) -> str:
    file_id = upload(store, content)
    with session_scope() as s:
        row, created = create_batch(
            s,
            settings=settings,
            input_file_id=file_id,
            endpoint=ENDPOINT,
            completion_window="24h",
            **kw,
        )
        assert created
        return row.id


def batch(batch_id: str) -> BatchRow:
    with session_scope() as s:
        row = s.get(BatchRow, batch_id)
        assert row is not None
        s.expunge(row)
        return row


def chunks(batch_id: str) -> list[ChunkRow]:
    with session_scope() as s:
        rows = list(
            s.scalars(
                select(ChunkRow).where(ChunkRow.batch_id == batch_id).order_by(ChunkRow.index)
            )
        )
        for row in rows:
            s.expunge(row)
        return rows
