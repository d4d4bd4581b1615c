"""The file store full, for real: a small tmpfs the test mounts as the stack's file store
(``LANEWAY_FILE_STORE``), filled with a filler file at each point that writes to it.

- An upload: a 503 ``storage_full`` that says so, and nothing left behind (no blob, no
  temporary, no file row); once space returns the same upload is stored.
- A chunk's results: the chunk is paused, not failed, and the batch completes with every
  line exactly once once space returns; with the store full for good, the batch fails
  with a ``storage_full`` error instead (and what its chunks wrote is removed).
- The finalisation: the parts fit but the output does not. The batch stays
  ``finalizing`` (never ``completed`` with a short or missing output) and completes once
  space returns, or, with the store full for good, fails with a ``storage_full`` error.

Mounting needs root: CI runs this stage as root, and a mount that fails is a failure.
Short leases keep the pauses short: a full store pauses work for
``min(LANEWAY_CHUNK_LEASE_S, 15 s x 2^(attempt - 1))``, and its last attempt
(``LANEWAY_CHUNK_MAX_ATTEMPTS``) fails the batch.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, func, select

from tasks.store.models import ChunkRow, FileRow
from tests.harness import Stack, wait_until
from tests.integration.batch_support import (
    ENDPOINT,
    FAKE,
    assert_exactly_once,
    assert_input_order,
    fake_entry,
    fake_stack,
    jsonl,
    requests,
    results,
    submit,
    wait_finished,
    wait_running,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(240)]

STORE_BYTES = 8 * 1024 * 1024
PAGE = 4096  # tmpfs gives each file whole pages
SLOW = "test/slow-fake"  # slow forwards: time to fill the store mid-run
WIDE = "test/wide-fake"  # 256 dimensions: output lines of ~5 KB, far more than a page
CHUNK_LINES, LEASE_S, MAX_ATTEMPTS = 10, 3, 3


def mount_tmpfs(where: Path, size: int) -> None:
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:  # CI runs this stage as root: a missing mount is a failure
        pytest.fail(f"could not mount a tmpfs at {where} (needs root): {done.stderr.strip()}")


def unmount(where: Path) -> None:
    done = subprocess.run(["umount", str(where)], capture_output=True, check=False)
    if done.returncode != 0:  # something still holds it open: detach it anyway
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("storage-full")
    store = root / "files"  # the stack's LANEWAY_FILE_STORE (tests/harness.py)
    store.mkdir()
    mount_tmpfs(store, STORE_BYTES)
    try:
        wide = fake_entry(WIDE)
        wide["defaults"] = {**wide["defaults"], "dimensions": 256}
        stack = fake_stack(
            root,
            entries=[fake_entry(SLOW, 0.2), wide],
            env={
                "LANEWAY_CHUNK_LINES": str(CHUNK_LINES),
                "LANEWAY_CHUNK_LEASE_S": str(LEASE_S),
                "LANEWAY_CHUNK_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
                "LANEWAY_REAPER_INTERVAL_S": "1",
            },
        )
        try:
            yield stack
        finally:
            stack.close()
    finally:
        unmount(store)


class Filler:
    """A file that takes the store's free space (all of it, or all but ``leave``)."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.path = store / "filler"

    def free_bytes(self) -> int:
        st = os.statvfs(self.store)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int = 0) -> None:
        want = self.free_bytes() - leave
        piece = b"\0" * 65536
        with self.path.open("ab", buffering=0) as f:
            while want > 0:
                try:
                    want -= f.write(piece[: min(len(piece), want)]) or 0
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
        assert self.free_bytes() <= max(leave, 0) + PAGE

    def empty(self) -> None:
        self.path.unlink(missing_ok=True)


@pytest.fixture
def filler(stack: Stack) -> Iterator[Filler]:
    filler = Filler(stack.root / "files")
    try:
        yield filler
    finally:
        filler.empty()


def store_files(stack: Stack) -> set[str]:
    """Every file in the store but the filler (temporaries included)."""
    root = stack.root / "files"
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} - {"filler"}


def file_rows(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(FileRow)) or 0)


def listed_files(http: httpx.Client) -> set[str]:
    response = http.get("/v1/files")
    assert response.status_code == 200, response.text
    return {f["id"] for f in response.json()["data"]}


def upload(http: httpx.Client, content: bytes) -> httpx.Response:
    return http.post(
        "/v1/files", files={"file": ("input.jsonl", content)}, data={"purpose": "batch"}
    )


def worker_log(stack: Stack) -> str:
    return "".join(p.read_text(errors="replace") for p in stack.log_dir.glob("*worker*.log"))


def assert_storage_full(batch: Any, what: str) -> None:
    assert batch.status == "failed", batch
    assert batch.output_file_id is None
    assert batch.errors is not None and len(batch.errors.data) == 1, batch.errors
    error = batch.errors.data[0]
    assert error.code == "storage_full"
    assert error.message.startswith(f"the file store is full: {what}"), error.message
    assert "could not be written" in error.message and "Free space" in error.message


def wait_removed(stack: Stack, batch_id: str) -> None:
    """The reaper removes what a failed batch's chunks wrote (its removal is owed)."""
    parts = stack.root / "files" / "batches" / batch_id
    wait_until(lambda: not parts.exists(), 30, f"the parts of {batch_id} to be removed")


# -- an upload ---------------------------------------------------------------------------------


def test_an_upload_to_a_full_store_fails_clearly_and_leaves_nothing(
    stack: Stack, http: httpx.Client, engine: Engine, filler: Filler
) -> None:
    content = jsonl(requests(100))
    files, rows, listed = store_files(stack), file_rows(engine), listed_files(http)
    filler.fill()
    response = upload(http, content)
    assert response.status_code == 503, response.text
    assert response.json() == {
        "error": {
            "message": "the file store is full: the file could not be stored. Nothing of it "
            "was kept; retry once space has been freed",
            "type": "service_unavailable",
            "param": "file",
            "code": "storage_full",
        }
    }
    assert store_files(stack) == files  # no blob, no temporary
    assert file_rows(engine) == rows and listed_files(http) == listed  # no row

    filler.empty()  # the operator frees space: the same upload is stored
    response = upload(http, content)
    assert response.status_code == 200, response.text
    assert response.json()["bytes"] == len(content)
    assert listed_files(http) == listed | {response.json()["id"]}
    live = http.post(ENDPOINT, json={"model": FAKE, "input": "still serving"})
    assert live.status_code == 200, live.text


# -- a chunk's results ---------------------------------------------------------------------------


def paused_chunks(engine: Engine, batch_id: str) -> int:
    """Chunks given back with a pause: their run could not write its results."""
    with engine.connect() as conn:
        return int(
            conn.scalar(
                select(func.count())
                .select_from(ChunkRow)
                .where(
                    ChunkRow.batch_id == batch_id,
                    ChunkRow.state == "pending",
                    ChunkRow.lease_until > time.time(),
                )
            )
            or 0
        )


def max_attempts(engine: Engine, batch_id: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.scalar(select(func.max(ChunkRow.attempts)).where(ChunkRow.batch_id == batch_id))
            or 0
        )


def test_chunks_wait_out_a_full_store_and_the_batch_completes_exactly_once(
    stack: Stack, client: Any, engine: Engine, filler: Filler
) -> None:
    lines = requests(600, model=SLOW, fail_every=50)
    ids = [x["custom_id"] for x in lines]
    batch = submit(client, lines)
    wait_running(client, batch.id, at_least=2 * CHUNK_LINES)
    filler.fill()
    wait_until(lambda: paused_chunks(engine, batch.id), 30, "a chunk paused on the full store")
    assert client.batches.retrieve(batch.id).status == "in_progress"
    filler.empty()

    batch = wait_finished(client, batch.id, timeout=120)
    assert batch.status == "completed", batch
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (600, 588, 12)
    output, errors = results(client, batch)
    assert (len(output), len(errors)) == (588, 12)
    assert_exactly_once(ids, output, errors)
    assert_input_order(ids, output)
    assert all(x["response"]["status_code"] == 200 for x in output)
    assert max_attempts(engine, batch.id) <= MAX_ATTEMPTS


def test_chunks_on_a_store_full_for_good_fail_the_batch_saying_so(
    stack: Stack, client: Any, engine: Engine, filler: Filler
) -> None:
    upload = client.files.create(file=("in.jsonl", jsonl(requests(40))), purpose="batch")
    filler.fill()  # before any chunk runs: none can write its results
    batch = client.batches.create(
        input_file_id=upload.id, endpoint=ENDPOINT, completion_window="24h"
    )
    batch = wait_finished(client, batch.id, timeout=90)
    assert_storage_full(batch, "the results of chunk")
    assert max_attempts(engine, batch.id) <= MAX_ATTEMPTS
    filler.empty()
    wait_removed(stack, batch.id)


# -- the finalisation ------------------------------------------------------------------------------


def room_for_parts_not_output(client: Any, input_id: str) -> int:
    """Free space that holds the chunk parts of a batch over ``input_id`` but not its
    output as well: a first batch over the same input measures the output (the parts
    together are that size, plus at most a page each)."""
    batch = client.batches.create(
        input_file_id=input_id, endpoint=ENDPOINT, completion_window="24h"
    )
    batch = wait_finished(client, batch.id, timeout=60)
    assert batch.status == "completed", batch
    output = client.files.retrieve(batch.output_file_id).bytes
    chunks = -(-batch.request_counts.total // CHUNK_LINES)
    assert chunks * PAGE < output // 2  # so the arithmetic below cannot let the output fit
    return output + chunks * PAGE + output // 4


def wait_finalisation_failed(stack: Stack, batch_id: str, times: int = 1) -> None:
    said = f"finalisation of {batch_id}: the file store is full"
    wait_until(lambda: worker_log(stack).count(said) >= times, 60, f"'{said}' x{times}")


def test_a_full_store_at_finalisation_never_completes_short_and_completes_later(
    stack: Stack, client: Any, filler: Filler
) -> None:
    lines = requests(100, model=WIDE)
    upload = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    filler.fill(leave=room_for_parts_not_output(client, upload.id))
    batch = client.batches.create(
        input_file_id=upload.id, endpoint=ENDPOINT, completion_window="24h"
    )
    wait_finalisation_failed(stack, batch.id, times=2)  # and tried again: still too full
    batch = client.batches.retrieve(batch.id)
    assert batch.status == "finalizing", batch
    assert batch.output_file_id is None and batch.error_file_id is None
    assert not any(
        name.startswith(f"results/{batch.id}/") for name in store_files(stack)
    )  # nothing of the output that did not fit
    filler.empty()

    batch = wait_finished(client, batch.id, timeout=60)
    assert batch.status == "completed", batch
    assert batch.request_counts.completed == 100
    output, errors = results(client, batch)
    assert errors == []
    assert_exactly_once([x["custom_id"] for x in lines], output, errors)
    assert_input_order([x["custom_id"] for x in lines], output)


def test_a_finalisation_on_a_store_full_for_good_fails_the_batch_saying_so(
    stack: Stack, client: Any, filler: Filler
) -> None:
    upload = client.files.create(
        file=("in.jsonl", jsonl(requests(100, model=WIDE))), purpose="batch"
    )
    filler.fill(leave=room_for_parts_not_output(client, upload.id))
    batch = client.batches.create(
        input_file_id=upload.id, endpoint=ENDPOINT, completion_window="24h"
    )
    batch = wait_finished(client, batch.id, timeout=60)
    assert_storage_full(batch, "the batch's output and error files")
    assert batch.request_counts.completed == 100  # its chunks did run: the output did not fit
    filler.empty()
    wait_removed(stack, batch.id)
    assert not any(name.startswith(f"results/{batch.id}/") for name in store_files(stack))
