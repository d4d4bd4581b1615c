"""The Batch API as a user meets it: `laneway up` (embedded Redis, SQLite, the real MiniLM)
driven only through the official openai client. Every embedding a batch returns must be
the one the live endpoint returns for the same input."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest

from laneway.embedded_redis import free_port
from tests.e2e.up import Up

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
ENDPOINT = "/v1/embeddings"
FINISHED = ("completed", "failed", "expired", "cancelled")


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    root = tmp_path_factory.mktemp("batch-up")
    env = {"HF_HUB_OFFLINE": "1", "LANEWAY_CHUNK_LINES": "8"}
    stack = Up(root / "data", free_port(), root / "up.log", env).start()
    try:
        stack.wait_healthy(timeout=180)
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def client(up: Up) -> Any:
    return openai.OpenAI(base_url=f"{up.base_url}/v1", api_key="unused", timeout=60)


def line(custom_id: str, text: Any, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": ENDPOINT,
        "body": {"model": MINILM, "input": text, **body},
    }


def to_jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


def wait_finished(client: Any, batch_id: str, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    batch = client.batches.retrieve(batch_id)
    while batch.status not in FINISHED:
        assert time.monotonic() < deadline, f"still {batch.status} after {timeout}s: {batch}"
        time.sleep(0.25)
        batch = client.batches.retrieve(batch_id)
    return batch


def lines_of(client: Any, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).content.splitlines()]


def vector(embedding: Any) -> np.ndarray:
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding), dtype="<f4")
    return np.asarray(embedding, dtype=np.float32)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


TOPICS = ["databases", "queues", "GPUs", "tokenizers", "leases", "reapers", "chunks", "files"]
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "laneway runs OpenAI batch files on your own hardware",
    "short",
    "Ünïcödé, emoji 🚀 and CJK 漢字 survive the batch lane",
    "Embeddings map text to vectors; similar meanings land close together.",
    *(f"sentence number {i} about {topic}" for i, topic in enumerate(TOPICS * 4)),
]


def test_batch_output_equals_the_live_endpoint(client: Any) -> None:
    lines = [line(f"s{i}", text) for i, text in enumerate(SENTENCES)]
    lines.insert(3, line("too-long", "word " * 400))  # over MiniLM's 256 tokens
    lines.insert(10, line("pair", ["first of a pair", "second of a pair"]))
    lines.insert(15, line("b64", "asked for in base64", encoding_format="base64"))
    lines.insert(20, line("tokens", [[101, 7592, 2088, 102]]))
    lines.insert(25, line("dims", "no matryoshka here", dimensions=64))
    ids = [x["custom_id"] for x in lines]
    bad = {"too-long", "dims"}

    upload = client.files.create(file=("batch.jsonl", to_jsonl(lines)), purpose="batch")
    assert upload.bytes == len(to_jsonl(lines))
    key = {"Idempotency-Key": f"e2e-{upload.id}"}
    metadata = {"suite": "e2e", "run": upload.id}
    created = client.batches.create(
        input_file_id=upload.id,
        endpoint=ENDPOINT,
        completion_window="24h",
        metadata=metadata,
        extra_headers=key,
    )
    retried = client.batches.create(
        input_file_id=upload.id, endpoint=ENDPOINT, completion_window="24h", extra_headers=key
    )
    assert retried.id == created.id  # a retried create is the same batch

    batch = wait_finished(client, created.id)
    assert batch.status == "completed", batch
    assert batch.metadata == metadata
    assert batch.model == MINILM
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (len(lines), len(lines) - 2, 2)

    output, errors = lines_of(client, batch.output_file_id), lines_of(client, batch.error_file_id)
    seen = [x["custom_id"] for x in output + errors]
    assert sorted(seen) == sorted(ids)  # each exactly once
    assert [x["custom_id"] for x in output] == [i for i in ids if i not in bad]  # input order
    assert all(x["response"]["status_code"] == 400 for x in errors)
    failures = {x["custom_id"]: x["response"]["body"]["error"] for x in errors}
    assert set(failures) == bad
    assert failures["too-long"]["code"] == "context_length_exceeded"
    assert failures["dims"]["param"] == "dimensions"

    by_id = {x["custom_id"]: x for x in lines}
    tokens = 0
    for entry in output:
        assert entry["error"] is None and entry["response"]["status_code"] == 200
        body = entry["response"]["body"]
        request = by_id[entry["custom_id"]]["body"]
        live = client.embeddings.create(
            model=MINILM, input=request["input"], encoding_format="float"
        )
        assert len(body["data"]) == len(live.data)
        for got, want in zip(body["data"], live.data, strict=True):
            assert got["index"] == want.index
            vec = vector(got["embedding"])
            assert vec.shape == (384,)
            assert cosine(vec, np.asarray(want.embedding)) > 0.999, entry["custom_id"]
        assert body["usage"]["prompt_tokens"] == live.usage.prompt_tokens
        tokens += body["usage"]["prompt_tokens"]
    assert isinstance(
        next(x for x in output if x["custom_id"] == "b64")["response"]["body"]["data"][0][
            "embedding"
        ],
        str,
    )
    assert batch.usage.input_tokens == tokens > 0


def test_a_batch_where_every_request_fails(client: Any) -> None:
    lines = [line(f"long{i}", "token " * 300) for i in range(3)]
    upload = client.files.create(file=("fail.jsonl", to_jsonl(lines)), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint=ENDPOINT, completion_window="24h"
    )
    batch = wait_finished(client, batch.id)
    assert batch.status == "completed"
    assert batch.output_file_id is None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (0, 3)
    assert sorted(x["custom_id"] for x in lines_of(client, batch.error_file_id)) == [
        "long0",
        "long1",
        "long2",
    ]
    with pytest.raises(openai.BadRequestError) as info:
        client.batches.cancel(batch.id)
    assert info.value.status_code == 400
    assert info.value.code == "batch_not_cancellable"


def test_a_bad_input_file_fails_the_batch(client: Any) -> None:
    content = to_jsonl([line("a", "x"), line("a", "y")]) + b"not json\n"
    upload = client.files.create(file=("bad.jsonl", content), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint=ENDPOINT, completion_window="24h"
    )
    batch = wait_finished(client, batch.id)
    assert batch.status == "failed"
    assert [(e.code, e.line, e.param) for e in batch.errors.data] == [
        ("duplicate_custom_id", 2, "custom_id"),
        ("invalid_json_line", 3, None),
    ]


def test_listing_sees_every_file_and_batch_once(client: Any) -> None:
    batches = list(client.batches.list(limit=1))  # one per page: the client must stop
    ids = [b.id for b in batches]
    assert len(ids) == len(set(ids)) >= 3
    assert [b.id for b in client.batches.list(limit=100)] == ids
    # a fresh stack: every file is some batch's input, output or error file
    referenced = {
        f for b in batches for f in (b.input_file_id, b.output_file_id, b.error_file_id) if f
    }
    files = [f.id for f in client.files.list(limit=2)]
    assert len(files) == len(set(files))
    assert set(files) == referenced
    assert [f.id for f in client.files.list(order="asc", limit=3)] == files[::-1]
    outputs = {f.id for f in client.files.list(purpose="batch_output")}
    assert outputs == {f for b in batches for f in (b.output_file_id, b.error_file_id) if f}


def test_delete_a_file(client: Any) -> None:
    upload = client.files.create(file=("gone.jsonl", b"{}\n"), purpose="batch")
    deleted = client.files.delete(upload.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (upload.id, "file", True)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(upload.id)
    with pytest.raises(openai.NotFoundError):
        client.files.content(upload.id)
    assert upload.id not in {f.id for f in client.files.list()}


def test_the_batch_cli_completes_a_batch_with_progress(up: Up, tmp_path: Path) -> None:
    """`laneway batch submit --wait` as a person runs it, against `laneway up`."""
    source = tmp_path / "in.jsonl"
    lines = [line(f"c{i}", f"cli text {i}") for i in range(120)] + [line("bad", "")]
    source.write_bytes(to_jsonl(lines))
    flags = ["--endpoint", ENDPOINT, "--wait", "--interval", "0.2", "--base-url", up.base_url]
    done = subprocess.run(
        [sys.executable, "-m", "laneway.cli", "batch", "submit", str(source), *flags],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "in_progress" in done.stdout or "completed" in done.stdout, done.stdout
    assert "/121 done" in done.stdout, done.stdout  # the progress line's counts
    out = (tmp_path / "in.output.jsonl").read_text().splitlines()
    errors = (tmp_path / "in.errors.jsonl").read_text().splitlines()
    assert len(out) == 120 and len(errors) == 1
    assert json.loads(errors[0])["custom_id"] == "bad"
