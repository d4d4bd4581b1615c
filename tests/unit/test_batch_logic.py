"""Batch API logic without processes: status transitions, input validation, pagination,
chunk fencing and finalisation, run in-process over a SQLite file.

Celery is never reached: ``enqueue_chunks``/``enqueue_advance`` are replaced by a recorder,
and the tests play the worker by calling ``run_chunk`` for each recorded chunk id.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import sessionmaker

import tasks.db
from configs.catalog import Catalog, load_catalog
from configs.settings import Settings
from tasks import batches
from tasks.batches import (
    LEGAL,
    TIMESTAMP_FIELD,
    BatchNotCancellable,
    Outcome,
    check_metadata,
    create_batch,
    request_cancel,
    transition,
    validate_input,
)
from tasks.db import make_engine, session_scope
from tasks.errors import InvalidRequest, LanewayError, NotFound
from tasks.files import (
    check_expires_after,
    create_file,
    delete_file,
    expire_files,
    get_file,
    list_files,
)
from tasks.filestore import FileStore
from tasks.models import Base, BatchRow, ChunkRow, FileRow
from tasks.pagination import page_object, paginate

FAKE = "laneway/fake-embeddings"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
ENDPOINT = "/v1/embeddings"
STATUSES = [*TIMESTAMP_FIELD, "validating"]


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``tasks.db.session_scope`` bound to a fresh SQLite file with every table."""
    engine = make_engine(f"sqlite:///{tmp_path / 'unit.db'}")
    Base.metadata.create_all(engine)
    monkeypatch.setattr(tasks.db, "_engine", engine)
    monkeypatch.setattr(tasks.db, "_sessions", sessionmaker(engine, expire_on_commit=False))
    try:
        yield
    finally:
        engine.dispose()


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    root = tmp_path / "files"
    root.mkdir()
    return FileStore(root)


@pytest.fixture
def catalog() -> Catalog:
    return load_catalog(None)


def make_settings(**kw: Any) -> Settings:
    values: dict[str, Any] = {"models": [FAKE, MINILM], "chunk_lines": 3}
    values.update(kw)
    return Settings(**values)


@dataclass
class Queue:
    """What the code under test would have sent to Celery."""

    chunks: list[int] = field(default_factory=list)
    advances: list[str] = field(default_factory=list)


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> Queue:
    queue = Queue()
    monkeypatch.setattr(batches, "enqueue_chunks", lambda cap, ids: queue.chunks.extend(ids))
    monkeypatch.setattr(batches, "enqueue_advance", lambda cap, bid: queue.advances.append(bid))
    return queue


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
    with session_scope() as s:
        row = create_file(
            s,
            store=store,
            source=io.BytesIO(content),
            filename="in.jsonl",
            purpose=purpose,
            max_bytes=10**9,
        )
        return row.id


def fake_execute(model: str, bodies: list[dict[str, Any]], renew: Any) -> list[Outcome]:
    """200 with a one-number 'embedding' per body, 400 for the input 'FAIL'."""
    out = []
    for body in bodies:
        if body["input"] == "FAIL":
            error = {"message": "no", "type": "invalid_request_error", "param": None, "code": "x"}
            out.append(Outcome(400, {"error": error}))
        else:
            tokens = len(body["input"].split())
            out.append(Outcome(200, {"object": "list", "data": [body["input"]]}, tokens))
    return out


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


def drain(
    sent: Queue,
    settings: Settings,
    store: FileStore,
    execute: Callable[..., list[Outcome]] = fake_execute,
    limit: int | None = None,
) -> int:
    """Play the worker: run every chunk message sent so far (and those they send)."""
    ran = 0
    while sent.chunks and (limit is None or ran < limit):
        chunk_id = sent.chunks.pop(0)
        batches.run_chunk(chunk_id, settings=settings, store=store, execute=execute)
        ran += 1
    return ran


def file_lines(store: FileStore, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    with session_scope() as s:
        key = get_file(s, file_id).storage_key
    return [json.loads(x) for x in store.path(key).read_bytes().splitlines()]


def make_row(status: str, **kw: Any) -> str:
    batch_id = f"batch_{status}_{time.monotonic_ns()}"
    with session_scope() as s:
        s.add(
            BatchRow(
                id=batch_id,
                endpoint=ENDPOINT,
                input_file_id="file-x",
                completion_window="24h",
                status=status,
                created_at=int(time.time()),
                request_total=0,
                request_completed=0,
                request_failed=0,
                prompt_tokens=0,
                **kw,
            )
        )
    return batch_id


# -- transition() ---------------------------------------------------------------------------


@pytest.mark.parametrize("source", STATUSES)
@pytest.mark.parametrize("target", list(TIMESTAMP_FIELD))
def test_transition_allows_exactly_the_legal_moves(db: None, source: str, target: str) -> None:
    batch_id = make_row(source)
    legal = target in LEGAL.get(source, set())
    with session_scope() as s:
        assert transition(s, batch_id, target) is legal
    row = batch(batch_id)
    if legal:
        assert row.status == target
        assert isinstance(getattr(row, TIMESTAMP_FIELD[target]), int)
    else:
        assert row.status == source
        assert getattr(row, TIMESTAMP_FIELD[target]) is None


def test_terminal_statuses_have_no_way_out() -> None:
    for terminal in ("completed", "failed", "expired", "cancelled"):
        assert terminal not in LEGAL
    assert LEGAL["finalizing"] == {"completed"}
    assert LEGAL["cancelling"] == {"cancelled"}


def test_transition_refuses_an_unknown_status(db: None) -> None:
    batch_id = make_row("in_progress")
    with session_scope() as s, pytest.raises(ValueError, match="unknown batch status"):
        transition(s, batch_id, "done")


def test_transition_sets_extra_values_only_when_it_moves(db: None) -> None:
    batch_id = make_row("finalizing")
    with session_scope() as s:
        assert transition(s, batch_id, "completed", output_file_id="file-out")
        assert not transition(s, batch_id, "completed", output_file_id="file-other")
    assert batch(batch_id).output_file_id == "file-out"


def test_transition_of_a_missing_batch_is_false(db: None) -> None:
    with session_scope() as s:
        assert transition(s, "batch_nope", "in_progress") is False


def test_cancel_moves_pending_and_queued_chunks_but_not_running_ones(
    db: None, store: FileStore, sent: Queue, catalog: Catalog
) -> None:
    settings = make_settings(batch_queued_chunks=2)
    batch_id = new_batch(settings, store, jsonl(12))
    batches.start(batch_id, settings=settings, catalog=catalog, store=store)
    with session_scope() as s:  # one chunk is being computed right now
        s.execute(
            update(ChunkRow)
            .where(ChunkRow.batch_id == batch_id, ChunkRow.index == 0)
            .values(state="running", attempts=1)
        )
    with session_scope() as s:
        row = request_cancel(s, batch_id)
        assert row.status == "cancelling"
        assert row.cancelling_at is not None
    assert [c.state for c in chunks(batch_id)] == ["running", "cancelled", "cancelled", "cancelled"]
    with session_scope() as s:  # asking again is harmless
        assert request_cancel(s, batch_id).status == "cancelling"


@pytest.mark.parametrize("status", ["completed", "failed", "expired", "finalizing"])
def test_cancel_of_a_finished_batch_is_refused(db: None, status: str) -> None:
    batch_id = make_row(status)
    with session_scope() as s, pytest.raises(BatchNotCancellable) as info:
        request_cancel(s, batch_id)
    assert info.value.status_code == 400
    assert info.value.code == "batch_not_cancellable"
    assert batch(batch_id).status == status


def test_cancel_of_an_unknown_batch_is_not_found(db: None) -> None:
    with session_scope() as s, pytest.raises(NotFound):
        request_cancel(s, "batch_missing")


# -- create_batch() -------------------------------------------------------------------------


def test_create_batch_checks_its_arguments(db: None, store: FileStore) -> None:
    settings = make_settings()
    file_id = upload(store, jsonl(2))
    user_file = upload(store, jsonl(2), purpose="user_data")
    good: dict[str, Any] = {
        "input_file_id": file_id,
        "endpoint": ENDPOINT,
        "completion_window": "24h",
    }
    cases: list[tuple[dict[str, Any], type[LanewayError], str]] = [
        ({"endpoint": "/v1/chat/completions"}, InvalidRequest, "endpoint"),
        ({"completion_window": "48h"}, InvalidRequest, "completion_window"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, InvalidRequest, "metadata"),
        ({"input_file_id": "file-missing"}, NotFound, "input_file_id"),
        ({"input_file_id": user_file}, InvalidRequest, "input_file_id"),
        ({"output_expires_after": {"anchor": "created_at", "seconds": 5}}, InvalidRequest, ""),
    ]
    for over, exc, param in cases:
        with session_scope() as s, pytest.raises(exc) as info:
            create_batch(s, settings=settings, **{**good, **over})
        assert param in str(info.value.param), over
    with session_scope() as s:
        row, created = create_batch(s, settings=settings, **good)
        assert created and row.status == "validating"
        assert row.expires_at == row.created_at + 24 * 3600


def test_create_batch_with_an_idempotency_key_returns_the_first(db: None, store: FileStore) -> None:
    settings = make_settings(completion_window_s=30)
    file_id = upload(store, jsonl(2))
    args: dict[str, Any] = {
        "input_file_id": file_id,
        "endpoint": ENDPOINT,
        "completion_window": "24h",
    }
    with session_scope() as s:
        first, created = create_batch(s, settings=settings, idempotency_key="k1", **args)
        assert created
        assert first.expires_at == first.created_at + 30  # LANEWAY_COMPLETION_WINDOW_S
    with session_scope() as s:
        again, created = create_batch(s, settings=settings, idempotency_key="k1", **args)
        assert not created and again.id == first.id
        other, created = create_batch(s, settings=settings, idempotency_key="k2", **args)
        assert created and other.id != first.id


def test_metadata_limits() -> None:
    assert check_metadata(None) is None
    assert check_metadata({f"k{i}": "v" for i in range(16)}) is not None
    for bad in (
        {f"k{i}": "v" for i in range(17)},
        {"k": 1},
        {"k" * 65: "v"},
        {"k": "v" * 513},
        ["k", "v"],
    ):
        with pytest.raises(InvalidRequest) as info:
            check_metadata(bad)
        assert info.value.param == "metadata"


def test_expires_after_bounds() -> None:
    assert check_expires_after(None, None, param="expires_after") is None
    assert check_expires_after("created_at", 3600, param="expires_after") == 3600
    assert check_expires_after("created_at", 30 * 24 * 3600, param="expires_after") is not None
    for anchor, seconds in [
        ("created_at", 3599),
        ("created_at", 30 * 24 * 3600 + 1),
        ("last_active_at", 3600),
        ("created_at", None),
        (None, 3600),
    ]:
        with pytest.raises(InvalidRequest) as info:
            check_expires_after(anchor, seconds, param="expires_after")
        assert str(info.value.param).startswith("expires_after[")


# -- validate_input() ------------------------------------------------------------------------


def validate(
    store: FileStore, catalog: Catalog, content: bytes, **settings: Any
) -> batches.Validation:
    store.path("files/v").parent.mkdir(parents=True, exist_ok=True)
    store.path("files/v").write_bytes(content)
    return validate_input(
        settings=make_settings(**settings),
        catalog=catalog,
        store=store,
        storage_key="files/v",
        size=len(content),
        endpoint=ENDPOINT,
    )


def test_a_valid_file_is_cut_into_chunks_at_line_boundaries(
    store: FileStore, catalog: Catalog
) -> None:
    content = jsonl(3) + b"\n  \n" + jsonl(5)[len(jsonl(3)) :] + line("last")
    # 3 requests, 2 blank lines, 2 more requests, then one more: 6 requests
    v = validate(store, catalog, content, chunk_lines=4)
    assert v.errors == []
    assert v.total == 6 and v.model == FAKE
    assert [(c.line_start, c.line_end) for c in v.chunks] == [(0, 4), (4, 6)]
    assert v.chunks[0].byte_start == 0 and v.chunks[-1].byte_end == len(content)
    assert v.chunks[0].byte_end == v.chunks[1].byte_start
    ids = []
    for c in v.chunks:
        part = content[c.byte_start : c.byte_end]
        ids += [json.loads(x)["custom_id"] for x in part.splitlines() if x.strip()]
    assert ids == ["req-0", "req-1", "req-2", "req-3", "req-4", "last"]


def test_a_file_without_a_final_newline_is_fine(store: FileStore, catalog: Catalog) -> None:
    v = validate(store, catalog, jsonl(2).rstrip(b"\n"))
    assert v.errors == [] and v.total == 2
    assert v.chunks[-1].byte_end == len(jsonl(2)) - 1


def without(key: str) -> bytes:
    obj = json.loads(line("x"))
    del obj[key]
    return json.dumps(obj).encode() + b"\n"


BAD_LINES: list[tuple[str, bytes, str, str | None]] = [
    # (id, the bad second line, code, param)
    ("not-json", b"{nope\n", "invalid_json_line", None),
    ("json-array", b'["custom_id"]\n', "invalid_json_line", None),
    ("non-utf8", b'{"custom_id": "\xff\xfe"}\n', "invalid_file_encoding", None),
    ("missing-custom-id", without("custom_id"), "missing_required_parameter", "custom_id"),
    ("missing-method", without("method"), "missing_required_parameter", "method"),
    ("missing-url", without("url"), "missing_required_parameter", "url"),
    ("missing-body", without("body"), "missing_required_parameter", "body"),
    ("body-null", line("x", body=None), "invalid_body", "body"),
    ("int-custom-id", line(7), "invalid_custom_id", "custom_id"),
    ("empty-custom-id", line(""), "invalid_custom_id", "custom_id"),
    ("duplicate-custom-id", line("req-0"), "duplicate_custom_id", "custom_id"),
    ("method-get", line("x", method="GET"), "invalid_method", "method"),
    ("wrong-url", line("x", url="/v1/chat/completions"), "invalid_url", "url"),
    ("body-string", line("x", body="hi"), "invalid_body", "body"),
    (
        "body-without-model",
        line("x", body={"input": "hi"}),
        "missing_required_parameter",
        "body.model",
    ),
    ("unknown-model", line("x", model="no/such-model"), "model_not_found", "body.model"),
    ("catalog-not-served", line("x", model="BAAI/bge-m3"), "model_not_found", "body.model"),
    ("mixed-models", line("x", model=MINILM), "mismatched_model", "body.model"),
]


@pytest.mark.parametrize(
    ("bad", "code", "param"), [c[1:] for c in BAD_LINES], ids=[c[0] for c in BAD_LINES]
)
def test_each_bad_line_is_reported_with_its_line_number(
    store: FileStore, catalog: Catalog, bad: bytes, code: str, param: str | None
) -> None:
    v = validate(store, catalog, line("req-0") + bad + line("req-2"))
    assert len(v.errors) == 1, v.errors
    error = v.errors[0]
    assert set(error) == {"code", "line", "message", "param"}
    assert (error["code"], error["line"], error["param"]) == (code, 2, param)
    assert error["message"]


def test_line_numbers_count_blank_lines(store: FileStore, catalog: Catalog) -> None:
    v = validate(store, catalog, line("a") + b"\n\n" + line("a"))
    assert [(e["code"], e["line"]) for e in v.errors] == [("duplicate_custom_id", 4)]


def test_too_many_requests(store: FileStore, catalog: Catalog) -> None:
    v = validate(store, catalog, jsonl(4), max_batch_lines=3)
    assert [(e["code"], e["line"]) for e in v.errors] == [("too_many_requests", 4)]
    assert validate(store, catalog, jsonl(3), max_batch_lines=3).errors == []


def test_file_too_large(store: FileStore, catalog: Catalog) -> None:
    content = jsonl(3)
    v = validate(store, catalog, content, max_batch_input_bytes=len(content) - 1)
    assert [(e["code"], e["line"]) for e in v.errors] == [("file_too_large", None)]
    assert validate(store, catalog, content, max_batch_input_bytes=len(content)).errors == []


def test_an_empty_file_fails(store: FileStore, catalog: Catalog) -> None:
    for content in (b"", b"\n\n  \n"):
        v = validate(store, catalog, content)
        assert [e["code"] for e in v.errors] == ["empty_file"]


def test_every_bad_line_is_listed_up_to_a_cap(store: FileStore, catalog: Catalog) -> None:
    v = validate(store, catalog, b"{x\n" * 5)
    assert [e["line"] for e in v.errors] == [1, 2, 3, 4, 5]
    v = validate(store, catalog, b"{x\n" * (batches.MAX_ERRORS_REPORTED + 50))
    assert len(v.errors) == batches.MAX_ERRORS_REPORTED


# -- pagination -------------------------------------------------------------------------------


def add_files(n: int, *, same_time: int | None = None) -> list[str]:
    ids = []
    with session_scope() as s:
        for i in range(n):
            file_id = f"file-{i:03d}"
            s.add(
                FileRow(
                    id=file_id,
                    filename=f"f{i}",
                    purpose="batch" if i % 2 == 0 else "user_data",
                    bytes=1,
                    created_at=same_time if same_time is not None else 1000 + i // 2,
                    status="processed",
                    storage_key=f"files/{file_id}",
                    deleted=False,
                )
            )
            ids.append(file_id)
    return ids


@pytest.mark.parametrize("order", ["asc", "desc"])
@pytest.mark.parametrize("limit", [1, 2, 3, 7, 8, 100])
def test_pages_cover_everything_once_in_order(db: None, order: Any, limit: int) -> None:
    ids = add_files(7)  # created_at ties in pairs: the id breaks them
    expected = ids if order == "asc" else ids[::-1]
    seen: list[str] = []
    after = None
    with session_scope() as s:
        for _ in range(20):
            rows, has_more = paginate(s, FileRow, where=[], limit=limit, order=order, after=after)
            page = page_object([{"id": r.id} for r in rows], has_more)
            assert len(page["data"]) <= limit
            seen += [d["id"] for d in page["data"]]
            if page["data"]:
                assert page["first_id"] == page["data"][0]["id"]
                assert page["last_id"] == page["data"][-1]["id"]
            if not has_more:
                break
            after = page["last_id"]
    assert seen == expected


def test_pages_with_equal_timestamps(db: None) -> None:
    ids = add_files(5, same_time=42)
    with session_scope() as s:
        first, more = paginate(s, FileRow, where=[], limit=2, order="desc")
        assert [r.id for r in first] == ids[::-1][:2] and more
        rest, more = paginate(s, FileRow, where=[], limit=10, order="desc", after=first[-1].id)
        assert [r.id for r in rest] == ids[::-1][2:] and not more


def test_page_after_an_unknown_id(db: None) -> None:
    with session_scope() as s, pytest.raises(InvalidRequest) as info:
        paginate(s, FileRow, where=[], limit=2, after="file-nope")
    assert info.value.param == "after"


def test_empty_page() -> None:
    assert page_object([], False) == {
        "object": "list",
        "data": [],
        "first_id": None,
        "last_id": None,
        "has_more": False,
    }


def test_file_listing_hides_deleted_and_expired_files(db: None, store: FileStore) -> None:
    ids = [upload(store, b"x\n", purpose="batch") for _ in range(4)]
    with session_scope() as s:
        delete_file(s, store=store, file_id=ids[0])
        s.execute(update(FileRow).where(FileRow.id == ids[1]).values(expires_at=int(time.time())))
        s.execute(update(FileRow).where(FileRow.id == ids[2]).values(expires_at=2**40))
    with session_scope() as s:
        rows, more = list_files(s, purpose=None, limit=100, order="asc", after=None)
        assert {r.id for r in rows} == set(ids[2:]) and not more
        rows, _ = list_files(s, purpose="user_data", limit=100, order="asc", after=None)
        assert rows == []
        for gone in ids[:2]:
            with pytest.raises(NotFound):
                get_file(s, gone)
    assert not store.exists(f"files/{ids[0]}")
    assert store.exists(f"files/{ids[1]}")  # until the reaper runs
    with session_scope() as s:
        assert expire_files(s, store=store) == 1
    assert not store.exists(f"files/{ids[1]}")
    assert store.exists(f"files/{ids[2]}")


def test_file_idempotency_key(db: None, store: FileStore) -> None:
    def make(key: str) -> str:
        with session_scope() as s:
            return create_file(
                s,
                store=store,
                source=io.BytesIO(b"a\n"),
                filename="a",
                purpose="batch",
                max_bytes=100,
                idempotency_key=key,
            ).id

    assert make("k") == make("k")
    assert make("k") != make("other")


# -- the file store ----------------------------------------------------------------------------


def test_store_write_limit_leaves_nothing_behind(store: FileStore) -> None:
    with pytest.raises(OverflowError):
        store.write_from("files/big", io.BytesIO(b"x" * 100), limit=99)
    assert not store.exists("files/big")
    assert list(store.path("files").iterdir()) == []
    assert store.write_from("files/ok", io.BytesIO(b"x" * 99), limit=99) == 99


def test_store_concat_skips_missing_parts_and_rejects_escapes(store: FileStore) -> None:
    store.write_lines("a/1", iter([b"one\n"]))
    store.write_lines("a/2", iter([b"two\n"]))
    assert store.concat("out", ["a/1", "a/missing", "a/2"]) == 8
    assert store.path("out").read_bytes() == b"one\ntwo\n"
    for bad in ("../x", "/etc/passwd", "a/../../x"):
        with pytest.raises(ValueError):
            store.path(bad)


# -- running batches in-process ----------------------------------------------------------------


def run_to_end(
    settings: Settings,
    store: FileStore,
    sent: Queue,
    catalog: Catalog,
    content: bytes,
    execute: Callable[..., list[Outcome]] = fake_execute,
) -> BatchRow:
    batch_id = new_batch(settings, store, content)
    batches.advance(batch_id, settings=settings, store=store, catalog=catalog)
    drain(sent, settings, store, execute)
    return batch(batch_id)


def test_a_batch_runs_chunk_by_chunk_and_keeps_input_order(
    db: None, store: FileStore, sent: Queue, catalog: Catalog
) -> None:
    settings = make_settings(chunk_lines=3, batch_queued_chunks=2)
    batch_id = new_batch(settings, store, jsonl(10, fail={4, 9}), metadata={"k": "v"})
    batches.advance(batch_id, settings=settings, store=store, catalog=catalog)
    row = batch(batch_id)
    assert row.status == "in_progress" and row.request_total == 10 and row.model == FAKE
    assert len(chunks(batch_id)) == 4
    assert len(sent.chunks) == 2  # only batch_queued_chunks go to Redis at once
    drain(sent, settings, store, limit=1)
    row = batch(batch_id)
    assert (row.request_completed, row.request_failed) == (3, 0)  # counts move while it runs
    drain(sent, settings, store)
    row = batch(batch_id)
    assert row.status == "completed"
    assert row.in_progress_at and row.finalizing_at and row.completed_at
    assert (row.request_total, row.request_completed, row.request_failed) == (10, 8, 2)
    assert row.metadata_ == {"k": "v"}
    out, err = file_lines(store, row.output_file_id), file_lines(store, row.error_file_id)
    assert [o["custom_id"] for o in out] == [f"req-{i}" for i in range(10) if i not in {4, 9}]
    assert [e["custom_id"] for e in err] == ["req-4", "req-9"]
    for entry in out:
        assert set(entry) == {"id", "custom_id", "response", "error"}
        assert entry["id"].startswith("batch_req_") and entry["error"] is None
        assert entry["response"]["status_code"] == 200
        assert entry["response"]["request_id"].startswith("req_")
        assert entry["response"]["body"]["data"] == [f"text {entry['custom_id'][4:]}"]
    assert all(e["response"]["status_code"] == 400 for e in err)
    assert len({e["id"] for e in out + err}) == 10
    assert row.prompt_tokens == 16  # two words for each of the 8 that succeeded
    assert batches.batch_object(row)["usage"]["input_tokens"] == 16
    assert not store.path(f"batches/{batch_id}").exists()  # chunk parts cleaned up


def test_a_batch_where_everything_fails_is_completed_without_output(
    db: None, store: FileStore, sent: Queue, catalog: Catalog
) -> None:
    row = run_to_end(make_settings(), store, sent, catalog, jsonl(5, fail=set(range(5))))
    assert row.status == "completed"
    assert row.output_file_id is None
    assert len(file_lines(store, row.error_file_id)) == 5
    assert (row.request_completed, row.request_failed) == (0, 5)


def test_a_batch_where_nothing_fails_has_no_error_file(
    db: None, store: FileStore, sent: Queue, catalog: Catalog
) -> None:
    row = run_to_end(make_settings(), store, sent, catalog, jsonl(4))
    assert row.status == "completed" and row.error_file_id is None
    assert len(file_lines(store, row.output_file_id)) == 4


def test_a_bad_file_fails_the_batch_with_every_error_listed(
    db: None, store: FileStore, sent: Queue, catalog: Catalog
) -> None:
    content = line("a") + b"{oops\n" + line("a") + line("b", method="GET")
    row = run_to_end(make_settings(), store, sent, catalog, content)
    assert row.status == "failed" and row.failed_at is not None
    obj = batches.batch_object(row)
    assert obj["errors"]["object"] == "list"
    assert [(e["code"], e["line"]) for e in obj["errors"]["data"]] == [
        ("invalid_json_line", 2),
        ("duplicate_custom_id", 3),
        ("invalid_method", 4),
    ]
    assert chunks(row.id) == [] and sent.chunks == []


def test_a_stale_run_never_commits(
    db: None, store: FileStore, sent: Queue, catalog: Catalog
) -> None:
    """A run whose lease was taken over (attempts moved on) discards its results."""
    settings = make_settings(chunk_lines=10)
    batch_id = new_batch(settings, store, jsonl(3))
    batches.advance(batch_id, settings=settings, store=store, catalog=catalog)
    (chunk_id,) = sent.chunks

    def overtaken(model: str, bodies: list[dict[str, Any]], renew: Any) -> list[Outcome]:
        with session_scope() as s:  # the reaper re-sent it and another worker claimed it
            s.execute(update(ChunkRow).where(ChunkRow.id == chunk_id).values(attempts=2))
        return fake_execute(model, bodies, renew)

    drain(sent, settings, store, overtaken)
    (chunk,) = chunks(batch_id)
    assert chunk.state == "running" and chunk.attempts == 2 and chunk.result_key is None
    row = batch(batch_id)
    assert row.status == "in_progress" and row.request_completed == 0
    assert list(store.path(f"batches/{batch_id}").iterdir()) == []
    # a redelivery while the new owner's lease runs does nothing either
    batches.run_chunk(chunk_id, settings=settings, store=store, execute=fake_execute)
    assert chunks(batch_id)[0].attempts == 2
    # once that lease runs out the reaper sends it again and it completes, counted once
    with session_scope() as s:
        s.execute(update(ChunkRow).where(ChunkRow.id == chunk_id).values(lease_until=0))
    batches.reap(settings=settings, store=store, catalog=catalog)
    assert sent.chunks == [chunk_id]
    drain(sent, settings, store)
    row = batch(batch_id)
    assert row.status == "completed" and row.request_completed == 3
    assert [o["custom_id"] for o in file_lines(store, row.output_file_id)] == [
        "req-0",
        "req-1",
        "req-2",
    ]


def test_a_chunk_delivered_too_often_fails_its_requests(
    db: None, store: FileStore, sent: Queue, catalog: Catalog
) -> None:
    settings = make_settings(chunk_lines=10, chunk_max_attempts=2)
    batch_id = new_batch(settings, store, jsonl(3))
    batches.advance(batch_id, settings=settings, store=store, catalog=catalog)
    with session_scope() as s:
        s.execute(update(ChunkRow).where(ChunkRow.batch_id == batch_id).values(attempts=2))

    def poison(model: str, bodies: list[dict[str, Any]], renew: Any) -> list[Outcome]:
        raise AssertionError("a chunk past its attempts must not run again")

    drain(sent, settings, store, poison)
    row = batch(batch_id)
    assert row.status == "completed" and row.output_file_id is None
    err = file_lines(store, row.error_file_id)
    assert [e["response"]["body"]["error"]["code"] for e in err] == ["chunk_failed"] * 3
    assert chunks(batch_id)[0].state == "failed"


def test_reaper_resends_queued_chunks_whose_message_was_lost(
    db: None, store: FileStore, sent: Queue, catalog: Catalog
) -> None:
    settings = make_settings(chunk_lines=2, batch_queued_chunks=2)
    batch_id = new_batch(settings, store, jsonl(6))
    batches.advance(batch_id, settings=settings, store=store, catalog=catalog)
    lost = list(sent.chunks)
    sent.chunks.clear()  # Redis was flushed
    batches.reap(settings=settings, store=store, catalog=catalog)
    assert sent.chunks == []  # their queue lease has not run out yet
    with session_scope() as s:
        s.execute(update(ChunkRow).where(ChunkRow.id.in_(lost)).values(lease_until=0))
    batches.reap(settings=settings, store=store, catalog=catalog)
    assert sorted(sent.chunks) == sorted(lost)
    drain(sent, settings, store)
    row = batch(batch_id)
    assert row.status == "completed" and row.request_completed == 6


def test_reaper_starts_a_batch_whose_advance_message_was_lost(
    db: None, store: FileStore, sent: Queue, catalog: Catalog
) -> None:
    settings = make_settings()
    batch_id = new_batch(settings, store, jsonl(4))
    batches.reap(settings=settings, store=store, catalog=catalog)
    assert batch(batch_id).status == "in_progress"
    drain(sent, settings, store)
    assert batch(batch_id).status == "completed"


def test_cancel_keeps_finished_chunks_and_true_counts(
    db: None, store: FileStore, sent: Queue, catalog: Catalog
) -> None:
    settings = make_settings(chunk_lines=2, batch_queued_chunks=2)
    batch_id = new_batch(settings, store, jsonl(8, fail={1}))
    batches.advance(batch_id, settings=settings, store=store, catalog=catalog)
    drain(sent, settings, store, limit=1)
    with session_scope() as s:
        request_cancel(s, batch_id)
    drain(sent, settings, store)  # what was still queued stops without running
    batches.advance(batch_id, settings=settings, store=store)
    row = batch(batch_id)
    assert row.status == "cancelled" and row.cancelled_at and row.cancelling_at
    assert (row.request_total, row.request_completed, row.request_failed) == (8, 1, 1)
    assert [o["custom_id"] for o in file_lines(store, row.output_file_id)] == ["req-0"]
    assert [o["custom_id"] for o in file_lines(store, row.error_file_id)] == ["req-1"]


def test_cancel_while_validating(db: None, store: FileStore, sent: Queue, catalog: Catalog) -> None:
    settings = make_settings()
    batch_id = new_batch(settings, store, jsonl(4))
    with session_scope() as s:
        assert batches._claim_batch(s, batch_id, "validating", 60)  # a validator is at work
    with session_scope() as s:
        request_cancel(s, batch_id)
    batches.advance(batch_id, settings=settings, store=store, catalog=catalog)
    row = batch(batch_id)
    assert row.status == "cancelled", "a validator's claim must not hold up the cancel"
    assert row.output_file_id is None and row.error_file_id is None
    assert chunks(batch_id) == []


def test_expiry_sends_unfinished_requests_to_the_error_file(
    db: None, store: FileStore, sent: Queue, catalog: Catalog
) -> None:
    settings = make_settings(chunk_lines=2, batch_queued_chunks=2)
    batch_id = new_batch(settings, store, jsonl(7, fail={0}))
    batches.advance(batch_id, settings=settings, store=store, catalog=catalog)
    drain(sent, settings, store, limit=1)
    with session_scope() as s:
        s.execute(update(BatchRow).where(BatchRow.id == batch_id).values(expires_at=0))
    batches.reap(settings=settings, store=store, catalog=catalog)
    row = batch(batch_id)
    assert row.status == "expired" and row.expired_at is not None
    assert (row.request_total, row.request_completed, row.request_failed) == (7, 1, 6)
    assert [o["custom_id"] for o in file_lines(store, row.output_file_id)] == ["req-1"]
    err = file_lines(store, row.error_file_id)
    assert [e["custom_id"] for e in err] == [f"req-{i}" for i in (0, 2, 3, 4, 5, 6)]
    assert err[0]["response"]["status_code"] == 400
    for entry in err[1:]:
        assert entry["response"] is None
        assert entry["error"]["code"] == "batch_expired"
    drain(sent, settings, store)  # late messages for expired chunks change nothing
    assert batch(batch_id).request_completed == 1


def test_concurrent_finishers_write_the_output_once(
    db: None, store: FileStore, sent: Queue, catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers see the last chunk of a cancelled batch stop at the same moment and both
    finish it: the output file must still hold every finished line."""
    settings = make_settings(chunk_lines=2, batch_queued_chunks=4)
    batch_id = new_batch(settings, store, jsonl(8))
    batches.advance(batch_id, settings=settings, store=store, catalog=catalog)
    drain(sent, settings, store, limit=2)
    with session_scope() as s:
        request_cancel(s, batch_id)

    real_concat = FileStore.concat
    interleaved = threading.Event()

    def concat(self: FileStore, key: str, parts: list[str]) -> int:
        if not interleaved.is_set():  # the other finisher runs to the end right here
            interleaved.set()
            batches.advance(batch_id, settings=settings, store=store)
        return real_concat(self, key, parts)

    monkeypatch.setattr(FileStore, "concat", concat)
    batches.advance(batch_id, settings=settings, store=store)
    assert interleaved.is_set()
    row = batch(batch_id)
    assert row.status == "cancelled"
    out = file_lines(store, row.output_file_id)
    assert [o["custom_id"] for o in out] == ["req-0", "req-1", "req-2", "req-3"]
    with session_scope() as s:
        assert (
            get_file(s, row.output_file_id or "").bytes
            == store.path(f"files/{row.output_file_id}").stat().st_size
        )


@pytest.mark.parametrize("how", ["deleted", "expired"])
def test_a_running_batch_keeps_its_input_file(
    db: None, store: FileStore, sent: Queue, catalog: Catalog, how: str
) -> None:
    """The input file is deleted (or expires) while its batch runs: the batch still
    finishes; the file is gone for the API at once, its content once the batch is done."""
    settings = make_settings(chunk_lines=2, batch_queued_chunks=2)
    batch_id = new_batch(settings, store, jsonl(6))
    input_id = batch(batch_id).input_file_id
    batches.advance(batch_id, settings=settings, store=store, catalog=catalog)
    drain(sent, settings, store, limit=1)
    with session_scope() as s:
        if how == "deleted":
            delete_file(s, store=store, file_id=input_id)
        else:
            s.execute(update(FileRow).where(FileRow.id == input_id).values(expires_at=1))
    with session_scope() as s:
        with pytest.raises(NotFound):
            get_file(s, input_id)
        listed, _ = list_files(s, purpose=None, limit=100, order="asc", after=None)
        assert input_id not in {r.id for r in listed}
    batches.reap(settings=settings, store=store, catalog=catalog)  # expires files too
    assert store.exists(f"files/{input_id}")  # not while the batch needs it
    drain(sent, settings, store)
    row = batch(batch_id)
    assert row.status == "completed"
    assert len(file_lines(store, row.output_file_id)) == 6
    batches.reap(settings=settings, store=store, catalog=catalog)
    assert not store.exists(f"files/{input_id}")


def test_output_files_expire_relative_to_their_own_creation(
    db: None, store: FileStore, sent: Queue, catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings()
    batch_id = new_batch(
        settings,
        store,
        jsonl(4, fail={0}),
        output_expires_after={"anchor": "created_at", "seconds": 3600},
    )
    real_now = batches._now
    monkeypatch.setattr(batches, "_now", lambda: real_now() + 1.5)  # finishing takes a while
    batches.advance(batch_id, settings=settings, store=store, catalog=catalog)
    drain(sent, settings, store)
    row = batch(batch_id)
    assert row.status == "completed"
    with session_scope() as s:
        for file_id in (row.output_file_id, row.error_file_id):
            info = get_file(s, file_id or "")
            assert info.expires_at == info.created_at + 3600
