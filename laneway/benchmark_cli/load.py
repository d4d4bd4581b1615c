"""The load: closed-loop clients that each send one request at a time, as fast as the
answers come back, through the same HTTP routes and lanes a client uses.

What a request is (its path, body, whether it streams) and how its answer counts come
from the capability's contract (``bench_request``, see ``tasks/contracts/base.py``): this
module only sends, times and reads through those readers, so it names no capability.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from tasks.contracts.base import Answer, BenchRequest

# the longest error text an outcome keeps (the first one is shown when all fail)
MAX_ERROR_CHARS = 500


@dataclass(frozen=True)
class Outcome:
    """One request: whether it succeeded, how long it took, and what its answer counted."""

    ok: bool
    latency_s: float
    ttft_s: float | None = None  # a stream: the time to its first chunk with text
    units: float | None = None
    input_tokens: float | None = None
    output_tokens: float | None = None
    text: str = ""
    error: str | None = None


@dataclass(frozen=True)
class Step:
    """One concurrency of the sweep: every request's outcome and the wall time from the
    first send to the last answer."""

    concurrency: int
    wall_s: float
    outcomes: list[Outcome]


MakeRequest = Callable[[int], BenchRequest]


def error_message(response: httpx.Response) -> str:
    """The OpenAI error's message of an error answer (else its text), with its status."""
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text.strip() or response.reason_phrase
    return f"HTTP {response.status_code}: {str(message)[:MAX_ERROR_CHARS]}"


def _failed(start: float, error: str) -> Outcome:
    return Outcome(ok=False, latency_s=time.perf_counter() - start, error=error)


def _payload(request: BenchRequest) -> dict[str, Any]:
    """httpx's keyword arguments for the request's body: JSON, or a multipart form."""
    if request.json is not None:
        return {"json": request.json}
    payload: dict[str, Any] = {"data": request.form or {}}
    if request.file is not None:
        payload["files"] = {"file": request.file}
    return payload


def _answered(request: BenchRequest, answer: Answer, start: float) -> Outcome:
    return Outcome(
        ok=True,
        latency_s=time.perf_counter() - start,
        units=request.units(answer),
        input_tokens=request.input_tokens(answer),
        output_tokens=request.output_tokens(answer),
        text=request.text(answer),
    )


async def send(client: httpx.AsyncClient, request: BenchRequest) -> Outcome:
    """Send one request and read its answer; every failure is an outcome, not an error:
    it counts against the success rate."""
    start = time.perf_counter()
    try:
        if request.stream:
            return await _streamed(client, request, start)
        response = await client.post(request.path, **_payload(request))
        if response.is_error:
            return _failed(start, error_message(response))
        answer = response.json()
        if not isinstance(answer, dict):
            return _failed(start, f"the answer is not a JSON object: {response.text[:200]}")
        return _answered(request, answer, start)
    except httpx.HTTPError as exc:
        return _failed(start, f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS])
    except ValueError as exc:  # a body that is not JSON
        return _failed(start, f"unreadable answer: {exc}"[:MAX_ERROR_CHARS])


def _chunk(line: str) -> dict[str, Any] | None:
    """A server-sent event's JSON chunk (None: not a data line, or the final ``[DONE]``)."""
    if not line.startswith("data:"):
        return None
    data = line[len("data:") :].strip()
    if not data or data == "[DONE]":
        return None
    chunk = json.loads(data)
    if not isinstance(chunk, dict):
        raise ValueError(f"a streamed chunk is not a JSON object: {data[:200]}")
    return chunk


def _event_error(error: Any) -> str:
    message = error.get("message") if isinstance(error, dict) else None
    said = message if isinstance(message, str) else json.dumps(error)
    return f"error event: {said}"[:MAX_ERROR_CHARS]


async def _streamed(client: httpx.AsyncClient, request: BenchRequest, start: float) -> Outcome:
    """A streamed answer: the TTFT at the first chunk with text; the readers' last values
    (the usage chunk comes last); the texts joined as the sample."""
    ttft: float | None = None
    parts: list[str] = []
    readings: dict[str, float | None] = {"units": None, "input_tokens": None, "output_tokens": None}
    async with client.stream("POST", request.path, **_payload(request)) as response:
        if response.is_error:
            await response.aread()
            return _failed(start, error_message(response))
        async for line in response.aiter_lines():
            chunk = _chunk(line)
            if chunk is None:
                continue
            if "error" in chunk:  # an OpenAI error body as an event: the stream failed
                return _failed(start, _event_error(chunk["error"]))
            text = request.text(chunk)
            if text:
                ttft = ttft if ttft is not None else time.perf_counter() - start
                parts.append(text)
            for name in readings:
                value = getattr(request, name)(chunk)
                readings[name] = value if value is not None else readings[name]
    return Outcome(
        ok=True,
        latency_s=time.perf_counter() - start,
        ttft_s=ttft,
        units=readings["units"],
        input_tokens=readings["input_tokens"],
        output_tokens=readings["output_tokens"],
        text="".join(parts),
    )


async def run_step(
    client: httpx.AsyncClient,
    make: MakeRequest,
    *,
    concurrency: int,
    requests: int | None,
    duration_s: float | None,
    seqs: itertools.count[int],
) -> Step:
    """``concurrency`` clients sending until ``requests`` were sent, or for ``duration_s``
    seconds (then the ones in flight finish). ``seqs`` numbers the requests across the
    run, so no two carry the same text."""
    outcomes: list[Outcome] = []
    start = time.perf_counter()
    stop_at = start + duration_s if duration_s is not None else None
    sent = 0

    async def client_loop() -> None:
        nonlocal sent
        while (requests is None or sent < requests) and (
            stop_at is None or time.perf_counter() < stop_at
        ):
            sent += 1
            outcomes.append(await send(client, make(next(seqs))))

    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return Step(concurrency=concurrency, wall_s=time.perf_counter() - start, outcomes=outcomes)
