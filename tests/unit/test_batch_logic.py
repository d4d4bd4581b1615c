"""Batch API logic without processes: status transitions, creation, cancellation, input
validation, pagination, files and the file store, over a SQLite file.

The engine itself (claims, leases, finalisers) runs in tests/integration/test_batch_engine.py,
on SQLite and Postgres."""

from __future__ import annotations

import errno
import io
import json
import time
from functools import partial
from typing import Any

import pytest
from sqlalchemy import update

from configs.catalog import Catalog
from configs.settings import Settings
from tasks.batches.lifecycle import BatchJob, validate_batch
from tasks.batches.service import (
    BatchNotCancellable,
    check_metadata,
    create_batch,
    get_batch,
    list_batches,
    request_cancel,
)
from tasks.batches.status import LEGAL, TIMESTAMP_FIELD, claim, transition
from tasks.batches.validation import MAX_ERRORS_REPORTED, Validation, validate_input
from tasks.errors import InvalidRequest, LanewayError, NotFound, StorageFull
from tasks.filestore import FileStore, MissingPart
from tasks.store.db import session_scope
from tasks.store.files import (
    check_expires_after,
    create_file,
    delete_file,
    expire_files,
    get_file,
    list_files,
)
from tasks.store.models import BatchRow, ChunkRow, FileRow
from tasks.store.pagination import page_object, paginate
from tests.batch_rows import (
    ENDPOINT,
    FAKE,
    MINILM,
    batch,
    chunks,
    jsonl,
    line,
    make_settings,
    new_batch,
    upload,
)

STATUSES = [*TIMESTAMP_FIELD, "validating"]


# -- fixtures -------------------------------------------------------------------------------


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
    # a finalisation ends where it leads, or in failed once it broke too often (give_up)
    assert LEGAL["finalizing"] == {"completed", "failed"}
    assert LEGAL["cancelling"] == {"cancelled", "failed"}


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


def validated(settings: Settings, store: FileStore, catalog: Catalog, content: bytes) -> str:
    batch_id = new_batch(settings, store, content)
    with session_scope() as s:
        claimed = claim(s, batch_id, "validating", 60)
    assert claimed is not None
    job = BatchJob(batch_id, "validating", *claimed)
    assert validate_batch(job, settings=settings, catalog=catalog, store=store) == "in_progress"
    return batch_id


def test_cancel_moves_pending_chunks_but_not_running_ones(
    db: None, store: FileStore, catalog: Catalog
) -> None:
    settings = make_settings()
    batch_id = validated(settings, store, catalog, jsonl(12))
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
        ({"endpoint": "/v1/completions"}, InvalidRequest, "endpoint"),
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


def validate(store: FileStore, catalog: Catalog, content: bytes, **settings: Any) -> Validation:
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
    assert [c.line_start for c in v.chunks] == [0, 4]
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
    ("wrong-url", line("x", url="/v1/completions"), "invalid_url", "url"),
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
    v = validate(store, catalog, b"{x\n" * (MAX_ERRORS_REPORTED + 50))
    assert len(v.errors) == MAX_ERRORS_REPORTED


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
        return str(
            create_file(
                store=store,
                source=io.BytesIO(b"a\n"),
                filename="a",
                purpose="batch",
                max_bytes=100,
                idempotency_key=key,
            )["id"]
        )

    assert make("k") == make("k")
    assert make("k") != make("other")


class _FullDisk(io.BytesIO):
    """An upload whose copy into the store meets a full disk after its first piece."""

    def read(self, size: int | None = -1) -> bytes:
        if self.tell():
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().read(4)


def test_an_upload_to_a_full_store_is_a_503_and_leaves_nothing(db: None, store: FileStore) -> None:
    with pytest.raises(StorageFull) as caught:
        create_file(
            store=store,
            source=_FullDisk(b"a\nbcdef\n"),
            filename="a",
            purpose="batch",
            max_bytes=100,
            idempotency_key="k",
        )
    assert caught.value.body() == {
        "error": {
            "message": "the file store is full: the file could not be stored. Nothing of it "
            "was kept; retry once space has been freed",
            "type": "service_unavailable",
            "param": "file",
            "code": "storage_full",
        }
    }
    assert caught.value.status_code == 503
    assert [p for p in store.path("").rglob("*") if p.is_file()] == []
    with session_scope() as s:
        assert s.query(FileRow).count() == 0
    # once space returns, the same upload (same key) is stored
    made = create_file(
        store=store,
        source=io.BytesIO(b"a\n"),
        filename="a",
        purpose="batch",
        max_bytes=100,
        idempotency_key="k",
    )
    assert store.path(f"files/{made['id']}").read_bytes() == b"a\n"


# -- the file store ----------------------------------------------------------------------------


def test_store_write_limit_leaves_nothing_behind(store: FileStore) -> None:
    with pytest.raises(OverflowError):
        store.write_from("files/big", io.BytesIO(b"x" * 100), limit=99)
    assert not store.exists("files/big")
    assert list(store.path("files").iterdir()) == []
    assert store.write_from("files/ok", io.BytesIO(b"x" * 99), limit=99) == 99


def test_store_concat_joins_parts_in_order(store: FileStore) -> None:
    store.write_lines("a/1", iter([b"one\n"]))
    store.write_lines("a/2", iter([b"two\n", b"three\n"]))
    assert store.concat("out", ["a/1", "a/2"]) == 14
    assert store.path("out").read_bytes() == b"one\ntwo\nthree\n"


def test_store_concat_refuses_a_missing_part_and_keeps_what_was_there(store: FileStore) -> None:
    """Assembling with a part missing must fail loudly, never write a short file."""
    store.write_lines("a/1", iter([b"one\n"]))
    store.write_lines("out", iter([b"complete output\n"]))
    with pytest.raises(MissingPart, match="a/missing"):
        store.concat("out", ["a/1", "a/missing"])
    assert store.path("out").read_bytes() == b"complete output\n"
    assert sorted(p.name for p in store.root.iterdir()) == ["a", "out"]  # no temporary left


def test_store_rejects_escapes(store: FileStore) -> None:
    for bad in ("../x", "/etc/passwd", "a/../../x"):
        with pytest.raises(ValueError):
            store.path(bad)


def test_store_iter_lines_reads_a_byte_range(store: FileStore) -> None:
    store.write_lines("f", iter([b"a\n", b"bb\n", b"ccc\n", b"tail"]))
    assert list(store.iter_lines("f", 2, 9)) == [b"bb\n", b"ccc\n"]
    assert list(store.iter_lines("f", 9, 13)) == [b"tail"]
    assert list(store.iter_lines("f", 0, 0)) == []


# -- owners ------------------------------------------------------------------------------------


def test_objects_of_another_owner_are_not_found(db: None, store: FileStore) -> None:
    """Every service read takes the caller's owner; another owner's file or batch is a
    404 exactly like an id that does not exist (None is the owner of a keyless API)."""
    settings = make_settings()
    made = create_file(
        store=store,
        source=io.BytesIO(jsonl(2)),
        filename="in.jsonl",
        purpose="batch",
        max_bytes=10**6,
        owner="alice",
    )
    file_id = str(made["id"])
    args: dict[str, Any] = {
        "settings": settings,
        "input_file_id": file_id,
        "endpoint": ENDPOINT,
        "completion_window": "24h",
    }
    with session_scope() as s:
        batch, _ = create_batch(s, **args, owner="alice")
        batch_id = batch.id
    for other in ("bob", None):
        with session_scope() as s:
            for read in (
                partial(get_file, s, file_id),
                partial(delete_file, s, store=store, file_id=file_id),
                partial(get_batch, s, batch_id),
                partial(request_cancel, s, batch_id),
                partial(create_batch, s, **args),
            ):
                with pytest.raises(NotFound):
                    read(owner=other)
            files_seen, _ = list_files(
                s, purpose=None, limit=10, order="asc", after=None, owner=other
            )
            assert files_seen == []
            assert list_batches(s, limit=10, after=None, owner=other)[0] == []
            with pytest.raises(InvalidRequest):  # nor is it an anchor to page after
                list_batches(s, limit=10, after=batch_id, owner=other)
    with session_scope() as s:
        assert get_file(s, file_id, owner="alice").owner == "alice"
        assert get_batch(s, batch_id, owner="alice").owner == "alice"
        mine, _ = list_batches(s, limit=10, after=None, owner="alice")
        assert [b.id for b in mine] == [batch_id]


def test_a_speech_batch_line_names_only_its_owners_files(db: None, store: FileStore) -> None:
    from workers.audio import _user_file

    made = create_file(
        store=store,
        source=io.BytesIO(b"RIFF"),
        filename="a.wav",
        purpose="user_data",
        max_bytes=100,
        owner="alice",
    )
    assert _user_file(str(made["id"]), "alice") == f"files/{made['id']}"
    for other in ("bob", None):
        with pytest.raises(InvalidRequest) as refused:
            _user_file(str(made["id"]), other)
        assert refused.value.param == "file"
