"""The file store's contract, run against both implementations: a local directory and
S3 on a real endpoint (moto's standalone server, see tests/s3_server.py).

The S3 store's parts are ``MIN_PART_BYTES`` (64 KiB, the server's minimum here), so a
write of a few hundred KiB is a real multipart upload."""

from __future__ import annotations

import io
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from configs.settings import Settings
from tasks.filestore import (
    COPY_CHUNK,
    FileStore,
    LocalFileStore,
    MissingPart,
    get_file_store,
)
from tasks.filestore.s3 import S3FileStore
from tests.s3_server import MIN_PART_BYTES, PAGE_KEYS, MotoServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PART = MIN_PART_BYTES


class Where:
    """One store under test, and how to look behind it."""

    def __init__(self, store: FileStore, moto: MotoServer | None, bucket: str = "") -> None:
        self.store = store
        self.moto = moto
        self.bucket = bucket

    def leftovers(self) -> list[str]:
        """Everything the store holds, temporaries and open uploads included."""
        if isinstance(self.store, LocalFileStore):
            root = self.store.root  # files only: a directory store keeps empty directories
            return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        assert self.moto is not None
        uploads = [f"upload:{u['Key']}" for u in self.moto.open_uploads(self.bucket)]
        return sorted(self.moto.keys(self.bucket)) + uploads


@pytest.fixture(scope="module")
def bucket(moto_s3: MotoServer) -> str:
    return moto_s3.new_bucket()


@pytest.fixture(params=["local", "s3"])
def where(request: pytest.FixtureRequest, tmp_path: Path, moto_s3: MotoServer) -> Iterator[Where]:
    if request.param == "local":
        root = tmp_path / "files"
        root.mkdir()
        yield Where(LocalFileStore(root), None)
        return
    # a bucket of its own per test: leftovers are this test's only
    own = moto_s3.new_bucket()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    store = S3FileStore(moto_s3.client(), own, "some/prefix", part_bytes=PART, tmp_dir=tmp)
    yield Where(store, moto_s3, own)


def blob(n: int) -> bytes:
    """``n`` bytes that differ everywhere (a misplaced part would show)."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += f"{i:08x}".encode()
        i += 1
    return bytes(out[:n])


def lines_of(data: bytes) -> list[bytes]:
    """``data`` cut after each b'\\n' (the last piece may have none)."""
    out = [x + b"\n" for x in data.split(b"\n")]
    out[-1] = out[-1][:-1]
    return [x for x in out if x]


class Trickle(io.RawIOBase):
    """``data`` in pieces of 10 kB, as a network upload arrives (so a write has sent
    parts before it sees the end); with ``fail``, the client goes away at the end."""

    def __init__(self, data: bytes, *, fail: bool = False) -> None:
        self.data = memoryview(data)
        self.fail = fail

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self.data and self.fail:
            raise ConnectionResetError("the client went away")
        n = min(len(buffer), len(self.data), 10_000)
        buffer[:n] = self.data[:n]
        self.data = self.data[n:]
        return n


# -- writes ---------------------------------------------------------------------------------


def test_a_small_write_reads_back_every_way(where: Where) -> None:
    store = where.store
    data = b"hello\nworld\n"
    assert store.write_from("files/a", io.BytesIO(data), limit=len(data)) == len(data)
    assert store.exists("files/a") and not store.exists("files/b")
    with store.open("files/a") as f:
        assert f.read() == data
    assert b"".join(store.iter_bytes("files/a")) == data
    with store.open("files/a") as f:
        assert list(f) == [b"hello\n", b"world\n"]


def test_a_multipart_write_round_trips(where: Where) -> None:
    data = blob(3 * PART + 12_345)
    assert where.store.write_from("files/big", io.BytesIO(data)) == len(data)
    pieces = list(where.store.iter_bytes("files/big"))
    assert b"".join(pieces) == data and all(len(p) <= COPY_CHUNK for p in pieces)
    with where.store.open("files/big") as f:
        assert f.read() == data
    if where.moto is not None:  # a multipart object's ETag ends in -<parts>
        assert isinstance(where.store, S3FileStore)
        head = where.moto.client().head_object(
            Bucket=where.bucket, Key=where.store.name("files/big")
        )
        assert head["ETag"].strip('"').endswith("-4")
    left = where.leftovers()
    assert not [x for x in left if x.startswith("upload:") or x.endswith(".tmp")], left


def test_write_past_the_limit_leaves_nothing_behind(where: Where) -> None:
    store = where.store
    store.write_lines("files/kept", iter([b"the earlier content\n"]))
    before = where.leftovers()
    big = blob(3 * PART)  # past two parts before the limit: a multipart upload is open
    with pytest.raises(OverflowError):
        store.write_from("files/big", Trickle(big), limit=2 * PART + 1)
    with pytest.raises(OverflowError):
        store.write_from("files/kept", Trickle(big), limit=len(big) - 1)
    assert where.leftovers() == before
    assert not store.exists("files/big")
    assert b"".join(store.iter_bytes("files/kept")) == b"the earlier content\n"
    assert store.write_from("files/exact", io.BytesIO(big), limit=len(big)) == len(big)


def test_a_failing_source_leaves_nothing_behind(where: Where) -> None:
    before = where.leftovers()
    with pytest.raises(ConnectionResetError):
        where.store.write_from("files/cut", Trickle(blob(2 * PART + 5), fail=True))
    assert where.leftovers() == before


def test_write_lines(where: Where) -> None:
    store = where.store
    lines = [f"line {i}\n".encode() for i in range(30_000)]  # several parts
    assert store.write_lines("out/x", iter(lines)) == sum(map(len, lines))
    assert list(store.iter_lines("out/x", 0, 10**9)) == lines
    assert store.write_lines("out/empty", iter([])) == 0
    assert store.exists("out/empty") and b"".join(store.iter_bytes("out/empty")) == b""


# -- ranges ---------------------------------------------------------------------------------


def test_iter_lines_reads_exactly_its_byte_range(where: Where) -> None:
    long_line = blob(COPY_CHUNK + PART + 3) + b"\n"  # longer than any read buffer
    lines = [b"a\n", b"bb\n", long_line, b"ccc\n", b"\n", b"dddd\n", b"tail"]
    data = b"".join(lines)
    where.store.write_lines("in/f", iter(lines))
    bounds = [0]
    for line in lines:
        bounds.append(bounds[-1] + len(line))
    for i, start in enumerate(bounds):
        for end in bounds[i:]:
            assert list(where.store.iter_lines("in/f", start, end)) == lines_of(data[start:end])
    mid = bounds[2] + 100  # inside the long line; a byte-exact end one byte into the next
    for start, end in [(1, 5), (mid, bounds[4] + 1), (bounds[3] - 1, bounds[3]), (3, 3)]:
        assert list(where.store.iter_lines("in/f", start, end)) == lines_of(data[start:end])
    assert list(where.store.iter_lines("in/f", bounds[5], len(data) + 1000)) == lines[5:]
    assert list(where.store.iter_lines("in/f", len(data) + 5, len(data) + 10)) == []


def test_reading_a_missing_key_is_file_not_found(where: Where) -> None:
    with pytest.raises(FileNotFoundError):
        where.store.open("files/none")
    with pytest.raises(FileNotFoundError):
        list(where.store.iter_bytes("files/none"))
    with pytest.raises(FileNotFoundError):
        list(where.store.iter_lines("files/none", 0, 10))
    with pytest.raises(FileNotFoundError):
        where.store.local_file("files/none")
    where.store.delete("files/none")  # deleting what is not there is fine


# -- concat ---------------------------------------------------------------------------------


def test_concat_joins_parts_in_order(where: Where) -> None:
    store = where.store
    parts = {"p/1": b"one\n", "p/2": blob(PART + 17) + b"\n", "p/3": b"", "p/4": blob(9000)}
    for key, data in parts.items():
        store.write_from(key, io.BytesIO(data))
    whole = b"".join(parts.values())
    assert store.concat("out/all", list(parts)) == len(whole)
    assert b"".join(store.iter_bytes("out/all")) == whole
    assert store.concat("out/none", []) == 0 and store.exists("out/none")


def test_concat_with_a_missing_part_writes_nothing(where: Where) -> None:
    store = where.store
    store.write_from("p/1", io.BytesIO(blob(2 * PART + 1)))  # a multipart upload is open
    store.write_lines("out/all", iter([b"complete output\n"]))
    before = where.leftovers()
    with pytest.raises(MissingPart) as caught:
        store.concat("out/all", ["p/1", "p/missing", "p/1"])
    assert str(caught.value) == "p/missing"
    with pytest.raises(MissingPart):
        store.concat("out/new", ["p/missing"])
    assert where.leftovers() == before
    assert b"".join(store.iter_bytes("out/all")) == b"complete output\n"


# -- listings and deletes -------------------------------------------------------------------


def test_listdir_names_what_is_directly_inside(where: Where) -> None:
    store = where.store
    names = [f"d/{i:02d}" for i in range(3 * PAGE_KEYS)]  # several pages
    for key in [*names, "d/sub/1", "d/sub/2", "dd/x", "e"]:
        store.write_lines(key, iter([b"x"]))
    assert sorted(store.listdir("d")) == [*names, "d/sub"]
    assert sorted(store.listdir("d/")) == [*names, "d/sub"]
    assert sorted(store.listdir("d/sub")) == ["d/sub/1", "d/sub/2"]
    assert store.listdir("missing") == []
    assert store.listdir("d/00") == []  # a key is not a directory


def test_delete_tree_removes_everything_under_the_prefix_only(where: Where) -> None:
    store = where.store
    inside = [f"t/{i}" for i in range(2 * PAGE_KEYS + 3)] + ["t/a/b/c", "t/a/d"]
    outside = ["tx/y", "other/t/z"]
    for key in inside + outside:
        store.write_lines(key, iter([b"x"]))
    store.delete_tree("t")
    assert store.listdir("t") == []
    assert not any(store.exists(k) for k in inside)
    assert store.exists("tx/y") and store.exists("other/t/z")
    store.delete_tree("t")  # again: nothing there is fine
    store.delete("tx/y")
    assert not store.exists("tx/y")


CALLS: dict[str, Any] = {
    "write_from": lambda store, key: store.write_from(key, io.BytesIO(b"x")),
    "write_lines": lambda store, key: store.write_lines(key, iter([b"x"])),
    "concat to": lambda store, key: store.concat(key, []),
    "concat from": lambda store, key: store.concat("ok", [key]),
    "open": lambda store, key: store.open(key),
    "iter_lines": lambda store, key: list(store.iter_lines(key, 0, 1)),
    "iter_bytes": lambda store, key: list(store.iter_bytes(key)),
    "exists": lambda store, key: store.exists(key),
    "delete": lambda store, key: store.delete(key),
    "delete_tree": lambda store, key: store.delete_tree(key),
    "listdir": lambda store, key: store.listdir(key),
    "local_file": lambda store, key: store.local_file(key),
}


@pytest.mark.parametrize("bad", ["../x", "a/../../b", "/etc/passwd", ".."])
def test_bad_keys_are_refused_everywhere(where: Where, bad: str) -> None:
    for name, call in CALLS.items():
        with pytest.raises(ValueError, match="bad file store key"):
            call(where.store, bad)
            pytest.fail(f"{name} took {bad!r}")
    assert where.leftovers() == []


# -- a local file for code that needs a path ------------------------------------------------


def test_local_file_is_the_content_until_closed(where: Where, tmp_path: Path) -> None:
    data = blob(2 * PART + 99)
    where.store.write_from("audio/x", io.BytesIO(data))
    with where.store.local_file("audio/x") as local:
        assert local.path.read_bytes() == data
    if isinstance(where.store, LocalFileStore):  # the store's own file, no copy
        assert local.path == where.store.path("audio/x") and local.path.exists()
    else:  # a temporary copy in the store's temporary directory, gone once closed
        assert local.path.parent == tmp_path / "tmp" and not local.path.exists()
        assert list((tmp_path / "tmp").iterdir()) == []
    assert where.store.exists("audio/x")


def test_write_keeping_local_reads_nothing_back(where: Where, tmp_path: Path) -> None:
    gets: list[str] = []
    if isinstance(where.store, S3FileStore):
        where.store.client.meta.events.register(
            "before-call.s3.GetObject", lambda **_: gets.append("GET")
        )
    data = blob(2 * PART + 99)
    size, local = where.store.write_keeping_local("audio/k", io.BytesIO(data), limit=len(data))
    with local:
        assert size == len(data) and local.path.read_bytes() == data
    assert gets == []  # the local copy is the one written from, not a download
    assert where.store.open("audio/k").read() == data
    assert len(gets) == (1 if isinstance(where.store, S3FileStore) else 0)  # the hook sees GETs
    if not isinstance(where.store, LocalFileStore):
        assert list((tmp_path / "tmp").iterdir()) == []
    with pytest.raises(OverflowError):
        where.store.write_keeping_local("audio/big", io.BytesIO(data), limit=len(data) - 1)
    [left] = where.leftovers()  # audio/k alone: no object, upload or temporary of the other
    assert left.endswith("audio/k")
    if not isinstance(where.store, LocalFileStore):
        assert list((tmp_path / "tmp").iterdir()) == []


# -- S3: sending a part while the next fills ---------------------------------------------------


class Counted(Trickle):
    """A ``Trickle`` that sets ``past`` once more than ``after`` bytes have been read."""

    def __init__(self, data: bytes, after: int) -> None:
        super().__init__(data)
        self.consumed, self.after, self.past = 0, after, threading.Event()

    def readinto(self, buffer: Any) -> int:
        n = super().readinto(buffer)
        self.consumed += n
        if self.consumed > self.after:
            self.past.set()
        return n


UPLOAD_PART = "before-parameter-build.s3.UploadPart"  # its handlers see the call's params


def s3_store(moto_s3: MotoServer) -> tuple[S3FileStore, str]:
    own = moto_s3.new_bucket()
    return S3FileStore(moto_s3.client(), own, "p", part_bytes=PART), own


def test_s3_reads_on_while_a_part_is_sent(moto_s3: MotoServer) -> None:
    """The first part's upload is held until the source has been read past it: a writer
    that sent each part before reading on would never get there (and time out here)."""
    store, _ = s3_store(moto_s3)
    data = blob(3 * PART + 7)
    # past the first part, and past the piece that filled it (reads are 10 kB)
    source = Counted(data, after=PART + 20_000)
    overlapped: list[bool] = []

    def hold_the_first(params: dict[str, Any], **_: Any) -> None:
        if params.get("PartNumber") == 1:
            overlapped.append(source.past.wait(10))

    store.client.meta.events.register(UPLOAD_PART, hold_the_first)
    assert store.write_from("files/big", source) == len(data)
    assert overlapped == [True]
    assert b"".join(store.iter_bytes("files/big")) == data


def test_s3_a_part_that_fails_in_flight_fails_the_write(moto_s3: MotoServer) -> None:
    store, bucket = s3_store(moto_s3)

    def refuse_the_second(params: dict[str, Any], **_: Any) -> None:
        if params.get("PartNumber") == 2:
            raise ConnectionError("the network went away")

    store.client.meta.events.register(UPLOAD_PART, refuse_the_second)
    for size in (2 * PART, 4 * PART + 1):  # raised by commit, and by the next part's send
        with pytest.raises(ConnectionError):
            store.write_from("files/cut", io.BytesIO(blob(size)))
    assert moto_s3.open_uploads(bucket) == [] and not store.exists("files/cut")


# -- sweeping what killed writers left -------------------------------------------------------


def killed_write(where: Where, key: str) -> None:
    """What a writer killed halfway through ``key`` leaves: a temporary file, or an open
    multipart upload holding two parts."""
    if isinstance(where.store, LocalFileStore):
        with where.store._tmp(key).open("wb") as out:
            out.write(blob(PART))
        return
    assert isinstance(where.store, S3FileStore)
    writer = where.store._writer(key)
    writer.write(blob(2 * PART))  # sent; neither committed nor aborted
    writer.landed()


def test_sweep_removes_only_abandoned_writes(where: Where, moto_s3: MotoServer) -> None:
    where.store.write_from("files/kept", io.BytesIO(blob(2 * PART)))
    before = where.leftovers()
    killed_write(where, "files/cut")
    killed_write(where, "batches/b/0.out")
    outside: dict[str, Any] = {}
    if where.moto is not None:  # another user of the bucket, outside our prefix
        client = moto_s3.client()
        outside = client.create_multipart_upload(Bucket=where.bucket, Key="other/x")
    assert len(where.leftovers()) == len(before) + 2 + (1 if outside else 0)
    young = 3600.0  # begun this long ago or less: it could still be being written
    if where.moto is not None:  # moto dates every upload 2010-11-10: go by the age it says
        begun = min(u["Initiated"] for u in where.moto.open_uploads(where.bucket))
        young += (datetime.now(UTC) - begun).total_seconds()
    assert where.store.sweep(young) == 0
    assert where.store.sweep(-1) == 2  # everything begun before now
    left = where.leftovers()
    assert [x for x in left if x not in before] == (["upload:other/x"] if outside else [])
    assert where.store.open("files/kept").read() == blob(2 * PART)
    assert where.store.sweep(-1) == 0


def test_sweep_never_removes_a_write_on_first_sight(where: Where) -> None:
    """However old the store's clock says a write is (moto dates every upload 2010), the
    sweep that first sees it leaves it: the write may be under way on a host whose clock
    disagrees. The next sweep removes it if it is still there."""
    killed_write(where, "files/cut")
    before = where.leftovers()
    assert where.store.sweep(-1) == 0  # older than now, but never seen before
    assert where.leftovers() == before
    assert where.store.sweep(-1) == 1
    assert len(where.leftovers()) == len(before) - 1


# -- choosing the store ---------------------------------------------------------------------


def test_get_file_store_reads_the_s3_settings(moto_s3: MotoServer, bucket: str) -> None:
    prefix = f"p{uuid.uuid4().hex[:6]}"
    env = moto_s3.env(bucket, prefix)
    settings = Settings(
        file_store=env["LANEWAY_FILE_STORE"],
        s3_endpoint_url=env["LANEWAY_S3_ENDPOINT_URL"],
        s3_region=env["LANEWAY_S3_REGION"],
        s3_access_key_id=env["LANEWAY_S3_ACCESS_KEY_ID"],
        s3_secret_access_key=env["LANEWAY_S3_SECRET_ACCESS_KEY"],
    )
    store = get_file_store(settings)
    assert isinstance(store, S3FileStore) and store is get_file_store(settings)
    store.write_lines("files/a", iter([b"x\n"]))
    assert moto_s3.keys(bucket, prefix) == [f"{prefix}/files/a"]
    assert store.part_bytes == settings.s3_part_bytes == 8 * 1024 * 1024
