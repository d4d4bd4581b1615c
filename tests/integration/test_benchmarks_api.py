"""/v1/benchmarks and batch estimates on a real stack (fake models, real Redis, worker,
database and API): records are read back, estimates count the work queued ahead, a
running batch carries ``estimated_completion_at`` (the official client takes the object
unchanged), workers fold their rates into rolling records, and bad input is a 400 or 404.

Records are made here with ``tasks.benchmarks.records`` on the stack's database; the
``laneway benchmark`` command that makes them is tested in test_benchmark_cli.py."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy.orm import Session

from tasks.benchmarks import records
from tasks.benchmarks.records import ROLLING, Measured
from tasks.store.db import make_engine
from tests.harness import Stack
from tests.integration.batch_support import (
    FAKE,
    jsonl,
    requests,
    slow_fake_stack,
    submit,
    wait_finished,
    wait_running,
)
from tests.integration.helpers import assert_openai_error

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SLOW = "test/slow-fake"
ALICE, BOB = "sk-alice-0123456789", "sk-bob-0123456789"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = slow_fake_stack(
        tmp_path_factory.mktemp("benchmarks-stack"),
        env={
            "LANEWAY_CHUNK_LINES": "10",
            "LANEWAY_API_KEYS": f"alice:{ALICE},bob:{BOB}",
            "LANEWAY_ROLLING_EVERY_S": "1",
        },
        delays={SLOW: 0.05},
    )
    try:
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="module")
def alice(stack: Stack) -> Any:
    return stack.openai_client(api_key=ALICE, max_retries=0)


@pytest.fixture(scope="module")
def http(stack: Stack) -> Iterator[httpx.Client]:
    with stack.http(headers={"authorization": f"Bearer {ALICE}"}) as c:
        yield c


def store_run(stack: Stack, rows: list[Measured]) -> str:
    engine = make_engine(stack.database_url)
    try:
        with Session(engine) as s, s.begin():
            return records.add_run(s, rows)
    finally:
        engine.dispose()


def measured(model: str, concurrency: int, rps: float) -> Measured:
    return Measured(
        model=model,
        capability="embeddings",
        engine="FakeEmbeddingBackend",
        device="cpu",
        workers=1,
        concurrency=concurrency,
        requests=50,
        success_rate=1.0,
        requests_per_s=rps,
        latency_p50_s=0.01,
        latency_p95_s=0.02,
        sample_response="[0.1, 0.2]",
    )


def test_the_routes_need_a_key(stack: Stack) -> None:
    with stack.http() as anonymous:
        for path in ("/v1/benchmarks/models", f"/v1/benchmarks/estimate?model={FAKE}&lines=1"):
            assert_openai_error(anonymous.get(path), 401)


def test_records_are_listed_per_model_and_compared(stack: Stack, http: httpx.Client) -> None:
    run = store_run(stack, [measured(FAKE, 1, 100.0), measured(FAKE, 8, 400.0)])
    listed = http.get("/v1/benchmarks/models").json()
    cards = {c["id"]: c for c in listed["data"]}
    assert {FAKE, SLOW} <= set(cards) and cards[FAKE]["served"] is True
    assert cards[FAKE]["basis"]["source"] == "benchmark"
    assert cards[FAKE]["basis"]["requests_per_s"] == pytest.approx(400.0)
    assert {r["run_id"] for r in cards[FAKE]["records"] if r["source"] != ROLLING} == {run}

    one = http.get(f"/v1/benchmarks/models/{FAKE}", params={"limit": 1}).json()
    assert one["object"] == "list" and len(one["data"]) == 1
    assert one["data"][0]["object"] == "benchmark.record" and one["data"][0]["model"] == FAKE

    compared = http.get("/v1/benchmarks/compare", params={"models": f"{FAKE},{SLOW}"}).json()
    assert [c["id"] for c in compared["data"]] == [FAKE, SLOW]


def test_an_estimate_is_checked_against_a_real_run(
    stack: Stack, http: httpx.Client, alice: Any
) -> None:
    """A record of the slow model from a measured batch; then the estimate of another
    batch of it, before it starts, against how long it really takes."""
    first = submit(alice, requests(60, model=SLOW, prefix="warm"))
    began = time.monotonic()
    done = wait_finished(alice, first.id)
    assert done.status == "completed"
    rate = 60 / max(done.completed_at - done.in_progress_at, time.monotonic() - began)
    store_run(stack, [measured(SLOW, 16, rate)])

    guess = http.get("/v1/benchmarks/estimate", params={"model": SLOW, "lines": 120}).json()
    assert guess["object"] == "benchmark.estimate" and guess["basis"]["source"] == "benchmark"
    assert guess["run_seconds"] == pytest.approx(120 / rate)

    upload = alice.files.create(
        file=("in.jsonl", jsonl(requests(120, model=SLOW))), purpose="batch"
    )
    from_file = http.get("/v1/benchmarks/estimate", params={"input_file_id": upload.id}).json()
    assert from_file["model"] == SLOW and from_file["lines"] == 120
    assert from_file["input_tokens"] > 0 and from_file["output_tokens"] == 0

    started = time.monotonic()
    batch = alice.batches.create(
        input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h"
    )
    assert batch.status == "validating"
    running = wait_running(alice, batch.id, at_least=10)
    # the official client keeps the extension field as it came
    assert isinstance(running, openai.types.Batch)
    eta = running.model_extra["estimated_completion_at"]
    assert isinstance(eta, int) and eta >= int(time.time()) - 1
    finished = wait_finished(alice, batch.id)
    real = time.monotonic() - started
    assert finished.status == "completed"
    assert finished.model_extra["estimated_completion_at"] is None
    assert 0.33 * real <= from_file["seconds"] <= 3 * real, (from_file, real)


def test_workers_fold_their_rates_into_rolling_records(
    stack: Stack, http: httpx.Client, alice: Any
) -> None:
    """A worker folds once its forwards have run a second (``MIN_BUSY_S``) since its last
    fold: 30 chunks of the slow model take 30 forwards of 0.05 s at least."""
    assert wait_finished(alice, submit(alice, requests(300, model=SLOW, prefix="roll")).id)
    deadline = time.monotonic() + 30
    while True:
        found = http.get(f"/v1/benchmarks/models/{SLOW}", params={"limit": 100}).json()["data"]
        rolling = [r for r in found if r["source"] == ROLLING]
        if rolling or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert rolling, found
    [row] = rolling
    assert row["requests_per_s"] > 0 and row["engine"] and row["device"] == "cpu"
    assert row["batch_size"] >= 1


def test_bad_input_is_a_400_or_404(stack: Stack, http: httpx.Client) -> None:
    estimate = "/v1/benchmarks/estimate"
    for params in (
        {"model": FAKE, "lines": -1},
        {"model": FAKE, "lines": 0},
        {"model": FAKE, "lines": 10**12},
        {"model": FAKE, "lines": "many"},
        {"model": FAKE, "lines": 5, "input_tokens": "NaN"},
        {"model": FAKE, "lines": 5, "input_tokens": "inf"},
        {"model": FAKE, "lines": 5, "output_tokens": -3},
        {"model": FAKE, "lines": 5, "output_tokens": 1e300},
        {"model": FAKE},
        {"lines": 5},
        {},
        {"model": FAKE, "lines": 5, "input_file_id": "file-x"},
    ):
        assert_openai_error(http.get(estimate, params=params), 400)
    for params in ({"model": "no/such-model", "lines": 5}, {"input_file_id": "file-nope"}):
        assert_openai_error(http.get(estimate, params=params), 404)
    assert_openai_error(http.get("/v1/benchmarks/models/no/such-model"), 404)
    # strings no database column could hold are looked up nowhere (Postgres refuses NUL)
    for hostile in ("a%00b", "x" * 5000, "%ED%A0%80", "%C3%A9t%C3%A9"):
        assert_openai_error(http.get(f"/v1/benchmarks/models/{hostile}"), 404)
    assert_openai_error(http.get(estimate, params={"model": "a\x00b", "lines": 1}), 404)
    assert_openai_error(http.get(f"/v1/benchmarks/models/{FAKE}", params={"limit": 0}), 400)

    # another owner's file is not found, however its id is learnt
    bob = stack.openai_client(api_key=BOB, max_retries=0)
    bobs = bob.files.create(file=("b.jsonl", jsonl(requests(3))), purpose="batch")
    assert_openai_error(http.get(estimate, params={"input_file_id": bobs.id}), 404)

    compare = "/v1/benchmarks/compare"
    many = ",".join(f"model-{i}" for i in range(100))
    assert_openai_error(http.get(compare, params={"models": many}), 400, contains="at most")
    assert_openai_error(http.get(compare, params={"models": " , "}), 400)
    assert_openai_error(http.get(compare, params={"models": f"{FAKE},nope"}), 404)
    assert http.get("/health").status_code == 200
