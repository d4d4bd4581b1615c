"""A request that breaks the model fails alone, and says nothing of what broke.

The fake backend's ``poison_token`` makes any forward holding that token raise (as a
kernel that crashes on one input would), with internal detail in the exception's text.
Requests computed in the same forward still get their vectors; the broken one gets a
500 in OpenAI's shape whose message names only its request id, and the worker's log
holds the detail under that id. Live calls and Batch API lines alike.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.harness import Stack, wait_until
from tests.integration.batch_support import (
    fake_entry,
    fake_stack,
    request,
    results,
    submit,
    wait_finished,
)
from tests.integration.helpers import assert_openai_error

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

POISONED = "test/poisoned"
POISON = 7  # the fake tokenizer puts 1 first, then the ids given
SECRET = "/srv/secret"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = fake_stack(
        tmp_path_factory.mktemp("poison-stack"),
        # a slow forward, so concurrent live requests share one
        entries=[fake_entry(POISONED, 0.4, poison_token=POISON)],
        env={"LANEWAY_CHUNK_LINES": "40"},
    )
    try:
        yield stack
    finally:
        stack.close()


def post(stack: Stack, inp: Any) -> httpx.Response:
    return httpx.post(
        f"{stack.base_url}/v1/embeddings", json={"model": POISONED, "input": inp}, timeout=30
    )


def test_a_live_request_that_breaks_the_forward_fails_alone(stack: Stack) -> None:
    inputs: list[Any] = [f"fine request {i}" for i in range(6)]
    inputs.insert(3, [POISON, 5])
    answers: dict[int, httpx.Response] = {}

    def call(i: int) -> None:
        answers[i] = post(stack, inputs[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for i, response in sorted(answers.items()):
        if i == 3:
            continue
        assert response.status_code == 200, (i, response.text)
        assert len(response.json()["data"][0]["embedding"]) == 32
    error = assert_openai_error(answers[3], 500)
    assert error["type"] == "server_error"
    assert SECRET not in answers[3].text and "fake kernel" not in answers[3].text
    request_id = error["message"].split("request id ")[1].split(")")[0]
    worker = stack.workers[-1]
    wait_until(
        lambda: f"live request {request_id} failed" in worker.log() and SECRET in worker.log(),
        10,
        "the worker to log the failure's detail under its request id",
    )
    assert post(stack, "still serving").status_code == 200


def test_a_batch_line_that_breaks_the_forward_fails_alone(stack: Stack) -> None:
    client = stack.openai_client(max_retries=0)
    lines = [request(f"r{i}", f"line {i}", model=POISONED) for i in range(30)]
    lines[12] = request("r12", [POISON], model=POISONED)
    batch = wait_finished(client, submit(client, lines).id)
    assert batch.status == "completed", batch
    assert (batch.request_counts.completed, batch.request_counts.failed) == (29, 1)
    output, errors = results(client, batch)
    assert [x["custom_id"] for x in errors] == ["r12"]
    response = errors[0]["response"]
    assert response["status_code"] == 500
    assert response["body"]["error"]["type"] == "server_error"
    assert response["request_id"] in response["body"]["error"]["message"]
    assert SECRET not in str(errors[0])
    assert len(output) == 29 and all(x["response"]["status_code"] == 200 for x in output)
    worker = stack.workers[-1]
    wait_until(
        lambda: f"batch request {response['request_id']} failed" in worker.log(),
        10,
        "the worker to log the failure under the line's request id",
    )
