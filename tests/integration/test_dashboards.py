"""The Grafana dashboard (docker/grafana/dashboards/laneway.json) against a live stack:
after traffic of every kind the dashboard shows (live embeddings and chat, a streamed
chat, an error, a Batch API batch), every expression's series, label matchers, fixed
label values and grouping labels are in a real /metrics scrape.

The stack runs as compose runs it: two API processes (their request metrics added up
across processes), a chat worker (a tiny random-weight Llama) and an embeddings worker
(the fake model), Redis and the database.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.chat_models import build_llama, chat_entry, write_catalog
from tests.dashboards import (
    Exported,
    declared_series,
    expressions,
    laneway_families,
    live_problems,
    load,
)
from tests.harness import Stack
from tests.integration.batch_support import requests, submit, wait_finished

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CHAT = "test/tiny-llama"
EMBED = "laneway/fake-embeddings"
# series that only a capability this test does not start reports: no speech worker runs
# here (Whisper on 2 cores next to a chat worker is too dear for one panel), so these are
# checked against the families api/metrics.py declares instead
DECLARED_ONLY = {"laneway_audio_seconds_total": "reported by speech workers only"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("dashboard-stack")
    model_dir = build_llama(root / "models")
    catalog = write_catalog(root / "catalog.yaml", [chat_entry(CHAT, model_dir, max_tokens=8)])
    stack = Stack(
        root,
        models=[CHAT, EMBED],
        model_config=catalog,
        capability="chat",
        env={"LANEWAY_CHUNK_LINES": "3", "LANEWAY_BATCH_POLL_S": "0.2"},
    )
    try:
        stack.start()
        chat = stack.start_worker(wait=False)
        embeddings = stack._launcher().worker("embeddings", name="embeddings")
        stack.workers.append(embeddings)
        stack.start_api({"LANEWAY_API_WORKERS": "2"})
        for proc in (chat, embeddings):
            stack.wait_worker_warm(proc, timeout=180)
        stack.wait_healthy(timeout=60)
        yield stack
    finally:
        stack.close()


def traffic(client: Any) -> None:
    """One of each thing a panel shows."""
    for _ in range(2):  # the second is answered from the embedding cache
        client.embeddings.create(model=EMBED, input=["dashboards", "for laneway"])
    client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "hello"}], max_tokens=4
    )
    stream = client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "stream"}], max_tokens=4, stream=True
    )
    assert [chunk for chunk in stream]
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such/model", input="x")  # an error by code
    batch = submit(client, requests(7, model=EMBED))
    assert wait_finished(client, batch.id).status == "completed"


def test_every_expression_names_series_the_stack_exports(stack: Stack) -> None:
    traffic(stack.openai_client(max_retries=0))
    queries = list(expressions(load()))
    live = [(w, q) for w, q in queries if not q.names & DECLARED_ONLY.keys()]
    assert len(live) > len(queries) - 3, "most expressions are checked live"
    # the workers report with their heartbeat: poll until their numbers are in
    deadline = time.monotonic() + 30
    while True:
        response = httpx.get(f"{stack.base_url}/metrics", timeout=10)
        assert response.status_code == 200, response.text
        exported = Exported.from_text(response.text)
        problems = live_problems(live, exported)
        if not problems or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not problems, "\n".join(problems)
    # the model variable lists exactly the served models
    assert exported.labels["laneway_workers"]["model"] == {CHAT, EMBED}
    # what no worker here reports: declared by a registered family, and not live
    declared = declared_series(laneway_families())
    for name, why in DECLARED_ONLY.items():
        assert name in declared, name
        assert name not in exported.labels, f"{name} is live now ({why}): check it live"
