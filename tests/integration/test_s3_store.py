"""The Files and Batch APIs, and audio, with the file store on S3 (moto's real server):
the API and each worker run as their own processes with data dirs and temporary
directories of their own, so they share nothing but Redis, the database and the bucket.

Everything a request stores must land in the bucket under the prefix, and nothing in a
process's own directories: no file under a data dir's files/, and no temporary copy
left once a request is done."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from tasks.media.audio_decode import NOT_ALLOWED
from tasks.store.models import FileRow
from tests.audio_files import clip_path, transcripts, wer
from tests.harness import Stack, wait_until
from tests.integration.batch_support import (
    FAKE,
    assert_exactly_once,
    assert_input_order,
    db_engine,
    jsonl,
    read_lines,
    requests,
    results,
    submit,
    wait_finished,
)
from tests.s3_server import MotoServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TINY = "Systran/faster-whisper-tiny.en"
PREFIX = "deploy/laneway"
PART_BYTES = 5 * 1024 * 1024  # the smallest the settings allow
PROCESSES = ("api", "embeddings", "audio")


@pytest.fixture(scope="module")
def bucket(moto_s3: MotoServer) -> str:
    return moto_s3.new_bucket()


def own_dirs(root: Path, name: str) -> dict[str, str]:
    """A process's own data dir and temporary directory."""
    (root / name / "tmp").mkdir(parents=True)
    return {"LANEWAY_DATA_DIR": str(root / name / "data"), "TMPDIR": str(root / name / "tmp")}


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, moto_s3: MotoServer, bucket: str
) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("s3-stack")
    env = {
        **moto_s3.env(bucket, PREFIX),
        "LANEWAY_S3_PART_BYTES": str(PART_BYTES),
        "LANEWAY_CHUNK_LINES": "10",
        "LANEWAY_REAPER_INTERVAL_S": "1",
        "LANEWAY_BATCH_POLL_S": "0.2",
    }
    stack = Stack(root, models=[FAKE, TINY], env=env)
    try:
        stack.start()
        embeddings = stack.start_worker(own_dirs(root, "embeddings"), wait=False)
        audio = stack._launcher().worker("audio", name="audio", overrides=own_dirs(root, "audio"))
        stack.workers.append(audio)
        stack.start_api(own_dirs(root, "api"))
        for proc in (embeddings, audio):
            stack.wait_worker_warm(proc, timeout=180)
        stack.wait_healthy(timeout=60)
        yield stack
    finally:
        stack.close()


def storage_key(stack: Stack, file_id: str) -> str:
    with db_engine(stack).connect() as conn:
        return str(conn.execute(select(FileRow.storage_key).where(FileRow.id == file_id)).scalar())


def assert_nothing_local(stack: Stack) -> None:
    """No process wrote a file store file of its own, and no temporary copy is left."""
    for name in PROCESSES:
        files = stack.root / name / "data" / "files"
        assert not files.exists() or not [p for p in files.rglob("*") if p.is_file()], name
        copies = list((stack.root / name / "tmp").glob("laneway-*"))
        assert copies == [], f"{name} left temporary copies: {copies}"


def test_a_batch_runs_with_every_file_in_the_bucket(
    stack: Stack, client: Any, moto_s3: MotoServer, bucket: str
) -> None:
    lines = requests(45, fail_every=10)
    ids = [x["custom_id"] for x in lines]
    created = submit(client, lines)
    input_key = f"{PREFIX}/{storage_key(stack, created.input_file_id)}"
    assert input_key in moto_s3.keys(bucket, PREFIX)

    batch = wait_finished(client, created.id, timeout=60)
    assert batch.status == "completed", batch
    assert (batch.request_counts.completed, batch.request_counts.failed) == (41, 4)
    output, errors = results(client, batch)
    assert_exactly_once(ids, output, errors)
    assert_input_order(ids, output)
    for entry in output:
        body = entry["response"]["body"]
        assert entry["response"]["status_code"] == 200
        assert body["model"] == FAKE and len(body["data"][0]["embedding"]) == 32
    assert [e["custom_id"] for e in errors] == ["r9", "r19", "r29", "r39"]

    parts = f"{PREFIX}/batches/{batch.id}/"

    def keys_once_parts_gone() -> set[str] | None:
        keys = set(moto_s3.keys(bucket, PREFIX))
        return None if any(k.startswith(parts) for k in keys) else keys

    # the finaliser removes the chunk parts after its commit (a crash in between leaves
    # them to the reaper, never the batch unfinished), so a client that is quick can see
    # the batch completed a moment before they are gone
    keys = wait_until(keys_once_parts_gone, 10, "the chunk parts to be removed")
    for file_id in (batch.output_file_id, batch.error_file_id):
        assert f"{PREFIX}/{storage_key(stack, file_id)}" in keys
    assert all(k.startswith(f"{PREFIX}/") for k in moto_s3.keys(bucket))
    assert moto_s3.open_uploads(bucket) == []
    assert_nothing_local(stack)


def test_a_large_upload_is_a_multipart_object(
    stack: Stack, client: Any, moto_s3: MotoServer, bucket: str
) -> None:
    data = b"".join(b"%08d some text for the file store\n" % i for i in range(200_000))
    assert len(data) > PART_BYTES
    uploaded = client.files.create(file=("big.jsonl", io.BytesIO(data)), purpose="user_data")
    assert uploaded.bytes == len(data)
    key = f"{PREFIX}/{storage_key(stack, uploaded.id)}"
    head = moto_s3.client().head_object(Bucket=bucket, Key=key)
    assert head["ContentLength"] == len(data) and head["ETag"].strip('"').endswith("-2")
    assert client.files.content(uploaded.id).content == data

    client.files.delete(uploaded.id)
    assert key not in moto_s3.keys(bucket, PREFIX)
    assert_nothing_local(stack)


def test_a_transcription_goes_through_the_bucket(
    stack: Stack, client: Any, moto_s3: MotoServer, bucket: str
) -> None:
    text = transcripts()["clip01"]
    with clip_path("clip01").open("rb") as f:
        got = client.audio.transcriptions.create(model=TINY, file=f).text
    assert wer(text, got) < 0.5, got
    # the upload is deleted once the request is done (by the worker and by the API)
    wait_until(lambda: not moto_s3.keys(bucket, f"{PREFIX}/audio/"), 10, "the upload to be deleted")
    wait_until(
        lambda: not list((stack.root / "audio" / "tmp").glob("laneway-*")), 10, "the copy to go"
    )
    assert_nothing_local(stack)


def test_an_audio_batch_reads_its_files_from_the_bucket(stack: Stack, client: Any) -> None:
    clip = clip_path("clip05")  # the shortest: about 3 s
    with clip.open("rb") as f:
        live = client.audio.transcriptions.create(model=TINY, file=f).text
    with clip.open("rb") as f:
        audio = client.files.create(file=("clip05.wav", f), purpose="user_data")
    lines = [
        {
            "custom_id": f"c{i}",
            "method": "POST",
            "url": "/v1/audio/transcriptions",
            "body": {"model": TINY, "file": audio.id},
        }
        for i in range(2)  # one file, fetched once for the chunk
    ]
    upload = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    created = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/audio/transcriptions", completion_window="24h"
    )
    batch = wait_finished(client, created.id, timeout=120)
    assert batch.status == "completed", batch
    out = read_lines(client, batch.output_file_id)
    assert sorted(x["custom_id"] for x in out) == ["c0", "c1"]
    assert all(x["response"]["body"]["text"] == live for x in out), out
    assert_nothing_local(stack)


def test_a_concat_list_is_refused_from_the_bucket(stack: Stack, client: Any) -> None:
    """The API probes its temporary copy of a live upload and the worker its download of a
    batch line's file: both through the same guarded opening as a directory store's."""
    with clip_path("clip05").open("rb") as f:
        audio = client.files.create(file=("clip05.wav", f), purpose="user_data")
    concat = f"ffconcat version 1.0\nfile '{audio.id}'\n".encode()
    with stack.http() as http:
        live = http.post(
            "/v1/audio/transcriptions",
            data={"model": TINY},
            files={"file": ("list.wav", concat)},
        )
    assert live.status_code == 400, live.text
    assert live.json()["error"]["message"] == NOT_ALLOWED
    attack = client.files.create(file=("list.wav", io.BytesIO(concat)), purpose="user_data")
    lines = [
        {
            "custom_id": cid,
            "method": "POST",
            "url": "/v1/audio/transcriptions",
            "body": {"model": TINY, "file": file_id},
        }
        for cid, file_id in (("attack", attack.id), ("good", audio.id))
    ]
    upload = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    created = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/audio/transcriptions", completion_window="24h"
    )
    batch = wait_finished(client, created.id, timeout=120)
    assert batch.status == "completed", batch
    [good] = read_lines(client, batch.output_file_id)
    [refused] = read_lines(client, batch.error_file_id)
    assert (good["custom_id"], good["response"]["status_code"]) == ("good", 200)
    assert (refused["custom_id"], refused["response"]["status_code"]) == ("attack", 400)
    assert refused["response"]["body"]["error"]["message"] == NOT_ALLOWED
    assert_nothing_local(stack)
