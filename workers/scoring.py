"""The engine of models that answer one row per input sequence in one forward pass
(rerankers, classifiers: whatever a ``ScoringBackend`` computes), on the token-budget
``Batcher`` (``workers/batching.py``): requests' sequences go to the batcher, live first,
and each request's future resolves to its rows, in order, and its token count.

Work reaches it from the live consumer's rounds (``ScoringLive``) and from Batch API
chunks; a capability's worker module declares a ``ScoringCapability`` (how a request
becomes sequences, how its rows become a reply) whose methods are the registry's entry
points (``make_engine``, ``live_handler``, ``batch_executor``).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, TypeVar

import numpy as np
import orjson

from configs.catalog import Catalog, CatalogEntry, load_catalog
from configs.settings import Settings
from tasks.batches.chunks import Executor
from tasks.batches.lines import Outcome
from tasks.errors import LanewayError
from tasks.queue.names import BATCH, LIVE, Lane
from tasks.store.usage import Usage
from workers.backends import load_backend
from workers.backends.base import ModelBackend
from workers.batching import Batcher
from workers.jobs import GoneCheck, JobMeta, failed
from workers.live import StreamSink
from workers.runtime import WorkerRuntime

R = TypeVar("R")  # a request as a capability checked it


class ScoringBackend(ModelBackend):
    """A model with one output row per input sequence: token sequences (special tokens
    included) to rows in one forward pass, in order."""

    @abstractmethod
    def forward(self, batch: Sequence[Sequence[int]]) -> np.ndarray: ...


@dataclass
class Scored:
    """One request's outputs: a row per sequence, in order, and the tokens it used."""

    rows: list[np.ndarray]
    prompt_tokens: int


class ScoringEngine:
    """One scoring model on a worker: its backend and batcher."""

    def __init__(
        self,
        backend: ScoringBackend,
        settings: Settings,
        *,
        gone: GoneCheck | None = None,
    ) -> None:
        self.entry = backend.entry
        self.backend = backend
        self.batcher = Batcher(
            backend,
            max_batch_size=settings.max_batch_size,
            token_budget=backend.entry.batch_token_budget,
            gone=gone,
            live_wait_s=settings.live_batch_wait_ms / 1000,
        )

    @classmethod
    def load(
        cls,
        entry: CatalogEntry,
        settings: Settings,
        *,
        device: str,
        gone: GoneCheck | None,
        kind: type[ScoringBackend],
    ) -> ScoringEngine:
        return cls(load_backend(entry, settings, device=device, kind=kind), settings, gone=gone)

    @property
    def warm(self) -> bool:
        return self.backend.warm

    def stop(self) -> None:
        self.batcher.stop()

    def metrics(self) -> dict[str, Any]:
        return self.batcher.stats.snapshot()

    def submit(
        self,
        jobs: Sequence[list[list[int]] | LanewayError],
        *,
        lane: Lane = LIVE,
        meta: Sequence[JobMeta] | None = None,
    ) -> list[Future[Scored]]:
        """Many requests' sequences (or the error that refused one) in one submission, a
        future each, without waiting (``Dropped`` when its caller went away)."""
        out: list[Future[Scored]] = []
        good: list[tuple[Future[Scored], list[list[int]], JobMeta]] = []
        for n, job in enumerate(jobs):
            if isinstance(job, LanewayError):
                out.append(failed(job))
                continue
            out.append(Future())
            good.append((out[-1], job, meta[n] if meta is not None else JobMeta()))
        started = self.batcher.submit_many(
            [seqs for _, seqs, _ in good], lane=lane, meta=[m for _, _, m in good]
        )
        for (result, seqs, _), future in zip(good, started, strict=True):
            future.add_done_callback(partial(_finish, result, sum(len(s) for s in seqs)))
        return out

    def run_many(
        self,
        jobs: Sequence[list[list[int]] | LanewayError],
        *,
        lane: Lane,
        meta: Sequence[JobMeta] | None = None,
    ) -> list[Scored | BaseException]:
        """``submit``, waited for: each request's result or what failed it."""
        results: list[Scored | BaseException] = []
        for future in self.submit(jobs, lane=lane, meta=meta):
            try:
                results.append(future.result())
            except Exception as exc:
                results.append(exc)
        return results


def _finish(result: Future[Scored], tokens: int, computed: Future[list[Any]]) -> None:
    exc = computed.exception()
    if exc is not None:
        result.set_exception(exc)
    else:
        result.set_result(Scored(list(computed.result()), tokens))


Prepare = Callable[[ScoringBackend, R], list[list[int]]]


def prepared(
    backend: ScoringBackend,
    requests: Sequence[R | LanewayError],
    prepare: Prepare[R],
) -> list[list[list[int]] | LanewayError]:
    """Each request's sequences, or the error that refuses it (it fails alone)."""
    out: list[list[list[int]] | LanewayError] = []
    for request in requests:
        try:
            if isinstance(request, LanewayError):
                raise request
            out.append(prepare(backend, request))
        except LanewayError as exc:
            out.append(exc)
    return out


class ScoringLive:
    """The ``LiveHandler`` of a capability on this engine: a live round goes to each
    model's engine in one submission (``prepare`` makes a request's sequences), and a
    finished request's reply is ``reply``'s JSON with the request's usage."""

    def __init__(
        self,
        runtime: WorkerRuntime,
        prepare: Prepare[dict[str, Any]],
        reply: Callable[[ScoringBackend, Scored], Any],
    ) -> None:
        self.runtime = runtime
        self.prepare = prepare
        self.reply = reply

    def submit(self, requests: Sequence[dict[str, Any]], sink: StreamSink) -> list[Future[Any]]:
        futures: list[Future[Any]] = [Future() for _ in requests]
        by_model: dict[str, list[int]] = {}
        for n, request in enumerate(requests):
            by_model.setdefault(str(request.get("model")), []).append(n)
        for model, indices in by_model.items():
            try:
                engine = self.runtime.engine_as(model, ScoringEngine)
            except LanewayError as exc:  # e.g. a model this worker does not serve
                for n in indices:
                    futures[n] = failed(exc)
                continue
            jobs = prepared(engine.backend, [requests[n] for n in indices], self.prepare)
            meta = [JobMeta.of(requests[n]) for n in indices]
            started = engine.submit(jobs, lane=LIVE, meta=meta)
            for n, future in zip(indices, started, strict=True):
                futures[n] = future
        return futures

    def encode(self, request: dict[str, Any], result: Scored) -> tuple[bytes, dict[str, Any]]:
        engine = self.runtime.engine_as(str(request.get("model")), ScoringEngine)
        body = orjson.dumps(self.reply(engine.backend, result))
        return body, {"usage": {"prompt_tokens": result.prompt_tokens}}


@dataclass(frozen=True)
class ScoringCapability(Generic[R]):
    """A capability on this engine, as its worker module declares it: the backend class
    its models load with, how a live request (``live``) or a checked Batch API line
    (``line``) becomes sequences, what a live reply holds (``reply``), how a line is
    checked (``check``: parsed, its model served, its rules met, as the live route checks
    it) and what its response body is (``respond``). Its methods are the registry's
    entry points."""

    kind: type[ScoringBackend]
    live: Prepare[dict[str, Any]]
    reply: Callable[[ScoringBackend, Scored], Any]
    check: Callable[[Catalog, list[str], dict[str, Any]], R]
    line: Prepare[R]
    respond: Callable[[ScoringBackend, R, Scored, str], dict[str, Any]]

    def make_engine(self, runtime: WorkerRuntime, entry: CatalogEntry) -> ScoringEngine:
        """Load a model (off the main thread)."""
        settings, device, gone = runtime.settings, runtime.device, runtime.gone
        return ScoringEngine.load(entry, settings, device=device, gone=gone, kind=self.kind)

    def live_handler(self, runtime: WorkerRuntime) -> ScoringLive:
        return ScoringLive(runtime, self.live, self.reply)

    def batch_executor(self, runtime: WorkerRuntime) -> Executor:
        """Batch API lines: each checked, then all computed together on the batch lane,
        each on its own: its response body and usage, or its error."""
        settings = runtime.settings
        catalog = load_catalog(settings.model_config_path)

        def checked(body: dict[str, Any]) -> R | LanewayError:
            try:
                return self.check(catalog, settings.models, body)
            except LanewayError as exc:
                return exc

        def execute(
            model: str, bodies: list[dict[str, Any]], request_ids: list[str], _owner: str | None
        ) -> list[Outcome]:
            engine = runtime.engine_as(model, ScoringEngine)
            lines = [checked(body) for body in bodies]
            jobs = prepared(engine.backend, lines, self.line)
            meta = [JobMeta.line(request_id) for request_id in request_ids]
            results = engine.run_many(jobs, lane=BATCH, meta=meta)
            return [
                self._outcome(engine.backend, line, result, request_id)
                for line, result, request_id in zip(lines, results, request_ids, strict=True)
            ]

        return execute

    def _outcome(
        self,
        backend: ScoringBackend,
        line: R | LanewayError,
        result: Scored | BaseException,
        request_id: str,
    ) -> Outcome:
        if isinstance(result, BaseException):
            return Outcome.failed(result, request_id)
        if isinstance(line, LanewayError):  # never: its result is that error
            return Outcome.error(line)
        body = self.respond(backend, line, result, request_id)
        return Outcome(200, body, Usage(prompt_tokens=result.prompt_tokens))
