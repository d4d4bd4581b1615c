"""Shared pieces of the Batch API tests: input files, a slow fake model, polling and the
exactly-once check over the output and error files."""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from tasks.store.db import make_engine
from tests.conftest import write_catalog
from tests.harness import Stack

ENDPOINT = "/v1/embeddings"
FAKE = "laneway/fake-embeddings"
SLOW_FAKE = "test/slow-fake"
FINISHED = ("completed", "failed", "expired", "cancelled")


def fake_entry(model_id: str, forward_delay_s: float = 0.0, **extra: Any) -> dict[str, Any]:
    """A copy of the catalog's fake backend: ``forward_delay_s`` makes every forward take
    a while; ``extra`` takes the backend's other knobs (``tokenize_delay_s``,
    ``poison_token``; see workers/backends/fake.py)."""
    return {
        "id": model_id,
        "capability": "embeddings",
        "backend": "workers.backends.fake:FakeEmbeddingBackend",
        "source": {"path": "/"},
        "defaults": {"max_input_tokens": 128, "batch_token_budget": 8192, "dimensions": 32},
        "memory_mb": 1,
        "forward_delay_s": forward_delay_s,
        **extra,
    }


def fake_stack(
    root: Path,
    *,
    entries: list[dict[str, Any]],
    env: dict[str, str],
    api_env: dict[str, str] | None = None,
) -> Stack:
    """Redis, the database, one worker serving the plain fake model and ``entries``, the
    API; all healthy."""
    catalog = write_catalog(root / "catalog.yaml", entries)
    stack = Stack(root, models=[*(e["id"] for e in entries), FAKE], model_config=catalog, env=env)
    try:
        stack.start()
        stack.start_worker(timeout=120)
        stack.start_api(api_env)
        stack.wait_healthy(timeout=60)
    except BaseException:
        stack.close()
        raise
    return stack


def slow_fake_stack(
    root: Path,
    *,
    env: dict[str, str],
    delays: dict[str, float],
    api_env: dict[str, str] | None = None,
) -> Stack:
    """``fake_stack`` with slow copies of the fake model (id -> forward delay)."""
    entries = [fake_entry(m, d) for m, d in delays.items()]
    return fake_stack(root, entries=entries, env=env, api_env=api_env)


def request(custom_id: str, text: Any, *, model: str = FAKE, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": ENDPOINT,
        "body": {"model": model, "input": text, **body},
    }


def jsonl(lines: list[Any]) -> bytes:
    return b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines)


def requests(n: int, *, model: str = FAKE, fail_every: int = 0, prefix: str = "r") -> list[Any]:
    """``n`` requests; with ``fail_every`` every such line has an empty input (a 400)."""
    return [
        request(
            f"{prefix}{i}",
            "" if fail_every and i % fail_every == fail_every - 1 else f"line number {i}",
            model=model,
        )
        for i in range(n)
    ]


def submit(client: Any, lines: list[Any], **create: Any) -> Any:
    upload = client.files.create(file=("input.jsonl", jsonl(lines)), purpose="batch")
    create.setdefault("endpoint", ENDPOINT)
    create.setdefault("completion_window", "24h")
    return client.batches.create(input_file_id=upload.id, **create)


def wait_for(client: Any, batch_id: str, until: Any, timeout: float = 90.0) -> Any:
    """Poll the batch until ``until(batch)`` is true; fail with its last state if not."""
    deadline = time.monotonic() + timeout
    batch = client.batches.retrieve(batch_id)
    while not until(batch):
        if time.monotonic() > deadline:
            raise AssertionError(f"batch {batch_id} still {batch.status} after {timeout}s: {batch}")
        time.sleep(0.2)
        batch = client.batches.retrieve(batch_id)
    return batch


def wait_finished(client: Any, batch_id: str, timeout: float = 90.0) -> Any:
    return wait_for(client, batch_id, lambda b: b.status in FINISHED, timeout)


def wait_running(client: Any, batch_id: str, *, at_least: int = 1, timeout: float = 60.0) -> Any:
    """Until some requests are done and some are not: the moment to break something."""

    def mid_run(b: Any) -> bool:
        if b.status in FINISHED:
            raise AssertionError(f"batch {batch_id} {b.status} before the fault: {b}")
        done = b.request_counts.completed + b.request_counts.failed
        return b.status == "in_progress" and at_least <= done < b.request_counts.total

    return wait_for(client, batch_id, mid_run, timeout)


def read_lines(client: Any, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).content.splitlines()]


def results(client: Any, batch: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return read_lines(client, batch.output_file_id), read_lines(client, batch.error_file_id)


def assert_exactly_once(
    expected_ids: list[str], output: list[dict[str, Any]], errors: list[dict[str, Any]]
) -> None:
    """Every custom_id of the input appears once across both files, and nothing else."""
    seen = [x["custom_id"] for x in output + errors]
    dups = [k for k, v in collections.Counter(seen).items() if v > 1]
    assert not dups, f"{len(dups)} custom_id(s) appear more than once, e.g. {dups[:5]}"
    missing = set(expected_ids) - set(seen)
    assert not missing, f"{len(missing)} custom_id(s) lost, e.g. {sorted(missing)[:5]}"
    assert len(seen) == len(expected_ids)
    assert len({x["id"] for x in output + errors}) == len(seen)  # batch_req ids are unique


def assert_input_order(expected_ids: list[str], lines: list[dict[str, Any]]) -> None:
    position = {cid: i for i, cid in enumerate(expected_ids)}
    got = [position[x["custom_id"]] for x in lines]
    assert got == sorted(got), "lines are not in input order"


def db_engine(stack: Stack) -> Engine:
    return make_engine(stack.database_url)
