"""``tasks.queue.publish.celery_message`` writes the same Redis message as Celery's ``send_task``.

The API does not publish live requests through Celery: it LPUSHes a hand-written
protocol-2 envelope (see ``tasks/queue/publish.py``) so that the event loop never blocks on
kombu. Nothing but this test ties that envelope to the Celery and kombu actually
installed, so a release that adds, drops or re-types a field would otherwise only show
up as workers rejecting or misreading live requests in production.

Against a private redis-server, each test here has the project's own Celery app
(``make_celery``) publish a task with ``send_task`` and reads back the raw JSON string
kombu stored in the queue's Redis list, then holds ``celery_message`` for the same task
name, arguments, queue and expiry to it:

* the same structure: the same keys at every level (top level, ``headers``,
  ``properties``, ``delivery_info`` and the decoded body's ``embed``) with values of
  the same JSON type;
* the same values for everything that is not per-message or per-process;
* the per-message and per-process fields (``delivery_tag``, ``origin``, ``reply_to``,
  the ``expires`` timestamp, ``argsrepr``) checked one by one, each with the reason it
  may differ;
* the same decoded body (base64, then JSON: args, kwargs, embed).

The live consumer's decoder (``decode_message``) reads Celery's own message and ours to
the same task name, id, expiry and argument. Finally a real Celery worker (in a thread,
solo pool) consumes our envelope from the queue: it runs a live request with the right
id, arguments and options, and drops one whose ``expires`` has passed, as it would a
message from ``send_task`` (batch hints are Celery tasks run by Celery's consumer, and
any Celery worker must be able to run what the API sends).

``pyproject.toml`` bounds celery and kombu to the versions this test has passed on.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery, Task
from celery.contrib.testing.worker import start_worker
from celery.signals import task_revoked

from configs.settings import Settings
from laneway.embedded_redis import start_redis
from tasks.queue.celery_app import make_celery
from tasks.queue.names import LIVE, queue_name, task_name
from tasks.queue.publish import ORIGIN, MalformedMessage, celery_message, decode_message

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

TASK = task_name("embeddings", LIVE)
QUEUE = queue_name("embeddings", LIVE)

# Fields whose value is per message or per process; everything else must be equal.
# Each is checked on its own in `check_per_message_fields`.
PER_MESSAGE_HEADERS = {"expires", "origin", "argsrepr"}
PER_MESSAGE_PROPERTIES = {"delivery_tag", "reply_to"}


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url = start_redis(Path(tmp_path_factory.mktemp("publish")) / "redis")
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    r = redis.Redis.from_url(redis_url)
    r.flushdb()
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def app(redis_url: str) -> Iterator[Celery]:
    celery_app = make_celery(Settings(redis_url=redis_url))
    try:
        yield celery_app
    finally:
        celery_app.close()


def live_payload() -> dict[str, Any]:
    """A live request as `api.live.LiveClient.call` sends it (non-ASCII text included)."""
    now = time.time()
    return {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "input": ["héllo wörld ✓", "a second input"],
        "encoding_format": "float",
        "id": uuid.uuid4().hex,
        "reply_to": uuid.uuid4().hex,
        "deadline": now + 30,
        "sent_at": now,
    }


def pop_only_message(client: redis.Redis, queue: str) -> dict[str, Any]:
    assert client.llen(queue) == 1, "expected exactly one message on the queue"
    raw = client.rpop(queue)
    assert isinstance(raw, bytes)
    message = json.loads(raw)
    assert isinstance(message, dict)
    return message


def decode_body(message: dict[str, Any]) -> Any:
    assert message["properties"]["body_encoding"] == "base64"
    assert message["content-type"] == "application/json"
    assert message["content-encoding"] == "utf-8"
    return json.loads(base64.b64decode(message["body"]).decode("utf-8"))


def shape(value: Any) -> Any:
    """The value's structure: every dict key and list position, and each leaf's JSON type."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(item) for item in value]
    return type(value).__name__


def without(mapping: dict[str, Any], keys: set[str]) -> dict[str, Any]:
    return {key: value for key, value in mapping.items() if key not in keys}


def check_per_message_fields(ours: dict[str, Any], celery: dict[str, Any]) -> None:
    """The fields allowed to differ, with why."""
    our_headers, celery_headers = ours["headers"], celery["headers"]
    our_props, celery_props = ours["properties"], celery["properties"]

    # `origin` names the sending process (`gen<pid>@host` for Celery); ours says the API
    assert isinstance(celery_headers["origin"], str)
    assert our_headers["origin"] == ORIGIN

    # `argsrepr` is only for logs and monitoring (Flower); ours leaves out the request
    # (its inputs can be large or private) while Celery writes repr(args)
    assert isinstance(celery_headers["argsrepr"], str)
    assert our_headers["argsrepr"] == "..."

    # `expires` is an absolute time, now + expires_s: equal up to the time between the two
    # publishes. It is what the worker goes by (an expired message is dropped unrun)
    if celery_headers["expires"] is None:
        assert our_headers["expires"] is None
    else:
        ours_at = datetime.fromisoformat(our_headers["expires"])
        celery_at = datetime.fromisoformat(celery_headers["expires"])
        assert ours_at.tzinfo is not None and celery_at.tzinfo is not None
        assert abs((ours_at - celery_at).total_seconds()) < 5

    # kombu's delivery tag is a fresh uuid4 per message
    uuid.UUID(celery_props["delivery_tag"])
    uuid.UUID(our_props["delivery_tag"])
    assert our_props["delivery_tag"] != celery_props["delivery_tag"]

    # `reply_to` is where a result backend (rpc://) would answer: Celery fills in the
    # producer's per-process oid whether or not one is configured. The project has no
    # result backend (tasks/queue/celery_app.py, task_ignore_result=True) and live replies
    # travel in the task's own arguments, so ours is empty
    assert isinstance(celery_props["reply_to"], str) and celery_props["reply_to"]
    assert our_props["reply_to"] == ""


@pytest.mark.parametrize("expires_s", [None, 30.0], ids=["no-expiry", "expires"])
def test_envelope_matches_send_task(
    app: Celery, client: redis.Redis, expires_s: float | None
) -> None:
    payload = live_payload()
    task_id = str(uuid.uuid4())

    # `ignore_result=True` is what our envelope encodes (the request itself says "store
    # nothing"); plain send_task would write None, which a worker resolves to the task's
    # own ignore_result, also True for the live tasks (workers/tasks.py)
    app.send_task(
        TASK,
        args=[payload],
        queue=QUEUE,
        expires=expires_s,
        task_id=task_id,
        ignore_result=True,
    )
    celery = pop_only_message(client, QUEUE)
    ours = json.loads(
        celery_message(TASK, [payload], queue=QUEUE, expires_s=expires_s, task_id=task_id)
    )

    # the same keys at every level, each value of the same JSON type
    assert ours.keys() == celery.keys()
    assert ours["headers"].keys() == celery["headers"].keys()
    assert ours["properties"].keys() == celery["properties"].keys()
    assert (
        ours["properties"]["delivery_info"].keys() == celery["properties"]["delivery_info"].keys()
    )
    assert shape(ours) == shape(celery)

    # the same decoded body: [args, kwargs, embed]
    our_body, celery_body = decode_body(ours), decode_body(celery)
    assert our_body == celery_body
    assert our_body == [
        [payload],
        {},
        {"callbacks": None, "errbacks": None, "chain": None, "chord": None},
    ]
    assert shape(our_body) == shape(celery_body)

    # the same values for everything that is not per-message
    assert without(ours, {"body", "headers", "properties"}) == without(
        celery, {"body", "headers", "properties"}
    )
    assert without(ours["headers"], PER_MESSAGE_HEADERS) == without(
        celery["headers"], PER_MESSAGE_HEADERS
    )
    assert without(ours["properties"], PER_MESSAGE_PROPERTIES) == without(
        celery["properties"], PER_MESSAGE_PROPERTIES
    )
    check_per_message_fields(ours, celery)

    # spelled out, so that a failure above reads plainly
    headers = ours["headers"]
    assert headers["lang"] == "py"
    assert headers["task"] == TASK
    assert headers["id"] == headers["root_id"] == task_id
    assert headers["parent_id"] is None
    assert headers["retries"] == 0
    assert headers["timelimit"] == [None, None]
    assert headers["ignore_result"] is True
    assert headers["kwargsrepr"] == "{}"
    properties = ours["properties"]
    assert properties["correlation_id"] == task_id
    assert properties["delivery_info"] == {"exchange": "", "routing_key": QUEUE}
    assert properties["delivery_mode"] == 2
    assert properties["priority"] == 0
    if expires_s is None:
        assert "expiration" not in properties
    else:
        assert properties["expiration"] == str(int(expires_s * 1000))


def test_the_live_consumer_decodes_send_task_and_ours_alike(
    app: Celery, client: redis.Redis
) -> None:
    payload, task_id = live_payload(), str(uuid.uuid4())
    app.send_task(TASK, args=[payload], queue=QUEUE, expires=30.0, task_id=task_id)
    [theirs] = client.rpop(QUEUE, 10) or []
    ours = celery_message(TASK, [payload], queue=QUEUE, expires_s=30.0, task_id=task_id)
    a, b = decode_message(theirs), decode_message(ours)
    assert (
        (a.task, a.task_id, a.request)
        == (b.task, b.task_id, b.request)
        == (
            TASK,
            task_id,
            payload,
        )
    )
    assert a.expires is not None and b.expires is not None
    assert (
        abs(datetime.fromisoformat(a.expires) - datetime.fromisoformat(b.expires)).total_seconds()
        < 5
    )
    for junk in (
        b"",
        b"not json",
        b"[]",
        b'{"headers": {}}',
        json.dumps({**json.loads(ours), "body": "!!"}),
    ):
        with pytest.raises(MalformedMessage):
            decode_message(junk)


def test_a_real_worker_runs_our_message(app: Celery, client: redis.Redis) -> None:
    seen: list[dict[str, Any]] = []
    done = threading.Event()

    @app.task(name=TASK, bind=True, ignore_result=True, acks_late=False)
    def live(self: Task, request: dict[str, Any]) -> None:
        seen.append(
            {
                "request": request,
                "id": self.request.id,
                "root_id": self.request.root_id,
                "retries": self.request.retries,
                "expires": self.request.expires,
                "ignore_result": self.request.ignore_result,
                "routing_key": (self.request.delivery_info or {}).get("routing_key"),
            }
        )
        done.set()

    revoked: list[tuple[str, bool]] = []

    def on_revoked(request: Any, expired: bool = False, **_: Any) -> None:
        revoked.append((request.id, expired))

    task_revoked.connect(on_revoked, sender=live, weak=False)

    expired_id, live_id = str(uuid.uuid4()), str(uuid.uuid4())
    expired, payload = live_payload(), live_payload()
    # kombu pops the right end of the list (FIFO for LPUSH), and the solo pool runs one
    # message at a time: once the second has run, the first has been dealt with
    client.lpush(
        QUEUE, celery_message(TASK, [expired], queue=QUEUE, expires_s=-1.0, task_id=expired_id)
    )
    client.lpush(
        QUEUE, celery_message(TASK, [payload], queue=QUEUE, expires_s=30.0, task_id=live_id)
    )

    try:
        with start_worker(app, pool="solo", perform_ping_check=False, queues=[QUEUE]):
            assert done.wait(timeout=30), "the worker did not run the live message"
    finally:
        task_revoked.disconnect(on_revoked, sender=live)

    # dropped for its `expires` header, not rejected as malformed
    assert revoked == [(expired_id, True)]
    assert len(seen) == 1, "the expired message ran"
    (ran,) = seen
    assert ran["request"] == payload
    assert ran["id"] == ran["root_id"] == live_id
    assert ran["retries"] == 0
    assert ran["ignore_result"] is True
    assert ran["routing_key"] == QUEUE
    assert ran["expires"] is not None
    assert client.llen(QUEUE) == 0
