"""Put a Celery task on a Redis queue from asyncio, without Celery's producer.

Celery's ``send_task`` costs about a millisecond of blocking work per call on the Redis
transport (kombu builds a new client per publish); on the live path that is most of the
overhead budget and it would block the API's event loop. This writes the same message a
Celery producer writes (protocol 2, JSON body, kombu's Redis envelope) with one ``LPUSH``
on the API's asyncio Redis client. Workers are ordinary Celery workers and cannot tell
the difference; ``tests/integration/test_publish.py`` holds it to Celery's own encoding
(against a real redis-server, and a real worker consumes it).
"""

from __future__ import annotations

import base64
import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from configs.tracing import carrier_of

ORIGIN = f"laneway-api{os.getpid()}@{socket.gethostname()}"


def celery_message(
    task: str,
    args: list[Any],
    *,
    queue: str,
    expires_s: float | None = None,
    task_id: str | None = None,
    trace: Mapping[str, str] | None = None,
) -> str:
    """The JSON string kombu's Redis transport stores for ``send_task(task, args)``.

    ``trace`` (W3C ``traceparent``/``tracestate``, only when tracing is on) goes into the
    headers, where Celery's own OpenTelemetry instrumentation puts it: without it the
    message is exactly Celery's."""
    task_id = task_id or str(uuid.uuid4())
    headers = _headers(task, task_id, expires_s)
    if trace:
        headers.update(trace)
    body = orjson.dumps(
        [args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    )
    envelope = {
        "body": base64.b64encode(body).decode("ascii"),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": _properties(task_id, queue, expires_s),
    }
    return orjson.dumps(envelope).decode()


def _headers(task: str, task_id: str, expires_s: float | None) -> dict[str, Any]:
    """Celery's protocol-2 task headers."""
    expires = (
        (datetime.now(UTC) + timedelta(seconds=expires_s)).isoformat()
        if expires_s is not None
        else None
    )
    return {
        "lang": "py",
        "task": task,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": expires,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": "...",
        "kwargsrepr": "{}",
        "origin": ORIGIN,
        "ignore_result": True,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }


def _properties(task_id: str, queue: str, expires_s: float | None) -> dict[str, Any]:
    """kombu's message properties, in the order its Redis transport writes them."""
    properties: dict[str, Any] = {
        "correlation_id": task_id,
        "reply_to": "",
        "delivery_mode": 2,
    }
    if expires_s is not None:
        # send_task(expires=...) also passes the TTL to kombu as a per-message
        # expiration, which kombu writes in milliseconds as a string (a past expiry
        # becomes 0); the worker itself goes by the `expires` header
        properties["expiration"] = str(int(max(expires_s, 0) * 1000))
    properties.update(
        {
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        }
    )
    return properties


class MalformedMessage(ValueError):
    """A queue entry that is not a protocol-2 task message with one JSON argument."""


@dataclass(frozen=True, slots=True)
class TaskMessage:
    """What a consumer needs of one task message: its name, id, expiry and argument, and
    the trace context it carries (W3C headers; None without one)."""

    task: str
    task_id: str
    expires: str | None
    request: dict[str, Any]
    trace: dict[str, str] | None = None


def decode_message(raw: bytes | str) -> TaskMessage:
    """The inverse of ``celery_message`` for any JSON protocol-2 message (Celery's own too):
    the first positional argument, which must be an object."""
    try:
        envelope = orjson.loads(raw)
        headers = envelope["headers"]
        body = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args, kwargs, _embed = orjson.loads(body)
        request = args[0] if args else next(iter(kwargs.values()))
        if not isinstance(request, dict):
            raise TypeError(f"argument is {type(request).__name__}, not an object")
        trace = carrier_of(headers) if "traceparent" in headers else None
        return TaskMessage(
            str(headers["task"]), str(headers["id"]), headers.get("expires"), request, trace
        )
    except (ValueError, TypeError, KeyError, IndexError, StopIteration) as exc:
        raise MalformedMessage(str(exc)) from None
