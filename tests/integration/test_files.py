"""/v1/files through the official openai client and raw HTTP: upload, retrieve, content,
delete, expiry, idempotent retries, pagination, and every bad request in OpenAI's shape."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from tasks.store.models import FileRow
from tests.conftest import MAIN_MAX_REQUEST_BYTES
from tests.harness import Stack
from tests.integration.batch_support import db_engine
from tests.integration.helpers import assert_openai_error

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

FILE_FIELDS = {"id", "object", "bytes", "created_at", "expires_at", "filename", "purpose", "status"}


@pytest.fixture(scope="module")
def stack(minilm_stack: Stack) -> Stack:
    return minilm_stack  # files need no model: any running stack will do


def stored(stack: Stack, file_id: str) -> Any:
    """Where the file store keeps a file's bytes."""
    return stack.root / "files" / "files" / file_id


def upload(client: Any, content: bytes = b"{}\n", purpose: str = "batch", **kw: Any) -> Any:
    return client.files.create(file=kw.pop("file", ("data.jsonl", content)), purpose=purpose, **kw)


def test_upload_retrieve_and_download(client: Any, http: httpx.Client, stack: Stack) -> None:
    content = "".join(f'{{"n": {i}, "text": "é ü 🚀"}}\n' for i in range(50)).encode()
    before = int(time.time())
    made = upload(client, file=("my input.jsonl", content))
    assert made.id.startswith("file-")
    assert made.object == "file"
    assert made.bytes == len(content)
    assert made.filename == "my input.jsonl"
    assert made.purpose == "batch"
    assert made.status == "processed"
    assert made.expires_at is None
    assert before <= made.created_at <= time.time() + 1

    raw = http.get(f"/v1/files/{made.id}")
    assert raw.status_code == 200
    assert set(raw.json()) >= FILE_FIELDS
    assert client.files.retrieve(made.id) == made

    body = client.files.content(made.id)
    assert body.content == content
    response = http.get(f"/v1/files/{made.id}/content")
    assert response.content == content
    assert "my input.jsonl" in response.headers["content-disposition"]
    assert stored(stack, made.id).read_bytes() == content


def test_a_file_larger_than_a_request_body_uploads(client: Any) -> None:
    """Uploads have their own limit (the main stack refuses other bodies over 2 MB)."""
    content = b"".join(b'{"i": %d, "pad": "%s"}\n' % (i, b"x" * 1000) for i in range(5000))
    assert len(content) > 2 * MAIN_MAX_REQUEST_BYTES
    made = upload(client, content)
    assert made.bytes == len(content)
    assert client.files.content(made.id).content == content


def test_expires_after_sets_expires_at(client: Any) -> None:
    made = upload(client, expires_after={"anchor": "created_at", "seconds": 3600})
    assert made.expires_at == made.created_at + 3600
    assert client.files.retrieve(made.id).expires_at == made.expires_at


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (
            {"expires_after[anchor]": "created_at", "expires_after[seconds]": "10"},
            "expires_after[seconds]",
        ),
        (
            {"expires_after[anchor]": "created_at", "expires_after[seconds]": "99999999"},
            "expires_after[seconds]",
        ),
        (
            {"expires_after[anchor]": "created_at", "expires_after[seconds]": "soon"},
            "expires_after[seconds]",
        ),
        (
            {"expires_after[anchor]": "last_active_at", "expires_after[seconds]": "3600"},
            "expires_after[anchor]",
        ),
    ],
)
def test_bad_expires_after(http: httpx.Client, fields: dict[str, str], param: str) -> None:
    response = http.post(
        "/v1/files", data={"purpose": "batch", **fields}, files={"file": ("a.jsonl", b"{}\n")}
    )
    assert_openai_error(response, 400, param=param)


def test_an_expired_file_disappears_and_the_reaper_removes_its_content(
    client: Any, http: httpx.Client, stack: Stack
) -> None:
    made = upload(
        client, b'{"soon": "gone"}\n', expires_after={"anchor": "created_at", "seconds": 3600}
    )
    kept = upload(client, b'{"stays": true}\n')
    assert stored(stack, made.id).exists()
    engine = db_engine(stack)  # an hour is the shortest expiry: move the clock instead
    try:
        with engine.begin() as conn:
            conn.execute(
                update(FileRow).where(FileRow.id == made.id).values(expires_at=int(time.time()) - 1)
            )
        for path in (f"/v1/files/{made.id}", f"/v1/files/{made.id}/content"):
            assert_openai_error(http.get(path), 404)
        assert_openai_error(http.delete(f"/v1/files/{made.id}"), 404)
        listed = {f["id"] for f in http.get("/v1/files").json()["data"]}
        assert made.id not in listed and kept.id in listed

        def reaped() -> bool:
            # the reaper removes the content, then commits the row: wait for both
            with engine.connect() as conn:
                deleted = conn.scalar(select(FileRow.deleted).where(FileRow.id == made.id))
            return bool(deleted) and not stored(stack, made.id).exists()

        deadline = time.monotonic() + 30  # the workers' reaper runs every few seconds
        while not reaped():
            assert time.monotonic() < deadline, "the reaper did not remove the expired file"
            time.sleep(0.2)
    finally:
        engine.dispose()
    assert stored(stack, kept.id).exists()
    assert client.files.content(kept.id).content == b'{"stays": true}\n'


def test_delete_then_everything_is_404(client: Any, http: httpx.Client, stack: Stack) -> None:
    made = upload(client, b'{"delete": "me"}\n')
    response = http.delete(f"/v1/files/{made.id}")
    assert response.status_code == 200
    assert response.json() == {"id": made.id, "object": "file", "deleted": True}
    assert not stored(stack, made.id).exists()
    for method, path in [
        ("GET", f"/v1/files/{made.id}"),
        ("GET", f"/v1/files/{made.id}/content"),
        ("DELETE", f"/v1/files/{made.id}"),
    ]:
        error = assert_openai_error(http.request(method, path), 404)
        assert made.id in error["message"]
    assert made.id not in {f["id"] for f in http.get("/v1/files").json()["data"]}
    deleted = upload(client)
    result = client.files.delete(deleted.id)  # and through the official client
    assert (result.id, result.object, result.deleted) == (deleted.id, "file", True)


def test_idempotency_key_returns_the_first_upload(client: Any, http: httpx.Client) -> None:
    key = f"upload-{time.monotonic_ns()}"
    first = upload(client, b'{"try": 1}\n', extra_headers={"Idempotency-Key": key})
    retry = upload(client, b'{"try": 2}\n', extra_headers={"Idempotency-Key": key})
    assert retry.id == first.id
    assert retry == first
    assert client.files.content(first.id).content == b'{"try": 1}\n'
    raw = http.post(
        "/v1/files",
        data={"purpose": "batch"},
        files={"file": ("x.jsonl", b"{}\n")},
        headers={"Idempotency-Key": key},
    )
    assert raw.status_code == 200 and raw.json()["id"] == first.id
    other = upload(client, b'{"try": 3}\n', extra_headers={"Idempotency-Key": key + "-b"})
    assert other.id != first.id
    ids = [f["id"] for f in http.get("/v1/files").json()["data"]]
    assert ids.count(first.id) == 1


# -- listing ------------------------------------------------------------------------------------


def full_listing(http: httpx.Client, **params: Any) -> list[dict[str, Any]]:
    body = http.get("/v1/files", params={"limit": 10000, **params}).json()
    assert body["has_more"] is False
    return list(body["data"])


def test_pagination_covers_every_file_once(client: Any, http: httpx.Client) -> None:
    mine = {upload(client, b'{"page": %d}\n' % i, purpose="user_data").id for i in range(5)}
    everything = full_listing(http)
    ids = [f["id"] for f in everything]
    assert mine <= set(ids)
    assert len(ids) == len(set(ids))
    keys = [(f["created_at"], f["id"]) for f in everything]
    assert keys == sorted(keys, reverse=True)  # newest first, ties broken by id

    walked: list[str] = []
    after = None
    for _ in range(len(ids) + 2):
        params: dict[str, Any] = {"limit": 2}
        if after:
            params["after"] = after
        page = http.get("/v1/files", params=params).json()
        assert page["object"] == "list"
        assert 1 <= len(page["data"]) <= 2
        assert page["first_id"] == page["data"][0]["id"]
        assert page["last_id"] == page["data"][-1]["id"]
        walked += [f["id"] for f in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert walked == ids

    # the official client follows has_more/after and must stop
    assert [f.id for f in client.files.list(limit=2)] == ids
    assert [f.id for f in client.files.list(order="asc", limit=3)] == ids[::-1]
    user_data = [f.id for f in client.files.list(purpose="user_data", limit=2)]
    assert mine <= set(user_data)
    assert all(f.purpose == "user_data" for f in client.files.list(purpose="user_data"))


def test_empty_page(http: httpx.Client) -> None:
    body = http.get("/v1/files", params={"purpose": "evals"}).json()
    assert body == {
        "object": "list",
        "data": [],
        "first_id": None,
        "last_id": None,
        "has_more": False,
    }


# -- bad requests ------------------------------------------------------------------------------


def test_wrong_purpose(http: httpx.Client) -> None:
    response = http.post(
        "/v1/files", data={"purpose": "nonsense"}, files={"file": ("a.jsonl", b"{}\n")}
    )
    error = assert_openai_error(response, 400, param="purpose")
    assert "nonsense" in error["message"]


def test_output_purpose_cannot_be_uploaded(http: httpx.Client) -> None:
    response = http.post(
        "/v1/files", data={"purpose": "batch_output"}, files={"file": ("a.jsonl", b"{}\n")}
    )
    assert_openai_error(response, 400, param="purpose")


def test_missing_file_field(http: httpx.Client) -> None:
    assert_openai_error(http.post("/v1/files", data={"purpose": "batch"}), 400, param="file")


def test_missing_purpose(http: httpx.Client) -> None:
    response = http.post("/v1/files", files={"file": ("a.jsonl", b"{}\n")})
    assert_openai_error(response, 400, param="purpose")


def test_json_instead_of_multipart(http: httpx.Client) -> None:
    response = http.post("/v1/files", json={"purpose": "batch", "file": "{}"})
    assert_openai_error(response, 400)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/files/file-doesnotexist"),
        ("GET", "/v1/files/file-doesnotexist/content"),
        ("DELETE", "/v1/files/file-doesnotexist"),
    ],
)
def test_unknown_file_id(http: httpx.Client, method: str, path: str) -> None:
    error = assert_openai_error(http.request(method, path), 404)
    assert "file-doesnotexist" in error["message"]


def test_unknown_file_through_the_client(client: Any) -> None:
    import openai

    with pytest.raises(openai.NotFoundError) as info:
        client.files.retrieve("file-doesnotexist")
    assert info.value.status_code == 404


@pytest.mark.parametrize(
    "params",
    [{"limit": 0}, {"limit": 10001}, {"limit": "many"}, {"order": "sideways"}],
)
def test_bad_list_parameters(http: httpx.Client, params: dict[str, Any]) -> None:
    assert_openai_error(http.get("/v1/files", params=params), 400)


def test_page_after_an_unknown_file(http: httpx.Client) -> None:
    assert_openai_error(http.get("/v1/files", params={"after": "file-nope"}), 400, param="after")
