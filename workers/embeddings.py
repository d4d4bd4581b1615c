"""The embeddings capability on the worker: live requests and Batch API lines.

Live requests come from the live consumer (``workers/live.py``) a round at a time and go
to the model's batcher without waiting; their replies carry the response's ``data``
array already encoded as the caller asked (base64 or floats), so the API passes it on
without decoding anything.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np
import orjson

from configs.catalog import CatalogEntry, load_catalog
from tasks.batches.chunks import Executor
from tasks.batches.lines import Outcome
from tasks.contracts.embeddings import embedding_body, normalise_input, parse_body, served_entry
from tasks.errors import InvalidRequest, LanewayError
from tasks.queue.names import BATCH, LIVE
from tasks.store.usage import Usage
from workers.embeddings_engine import EmbedCall, EmbeddingEngine, EmbedResult
from workers.jobs import JobMeta
from workers.live import StreamSink
from workers.runtime import WorkerRuntime


def encode_vector(vec: np.ndarray) -> str:
    """Little-endian float32, base64: what OpenAI returns for encoding_format=base64."""
    return base64.b64encode(vec.astype("<f4").tobytes()).decode("ascii")


def data_fragment(vectors: Sequence[np.ndarray], encoding_format: str) -> bytes:
    """The response's ``data`` array as JSON: base64 strings, or float32 values written
    in their shortest form (each parses back to exactly the float32 computed)."""
    if encoding_format == "base64":
        items: list[dict[str, Any]] = [
            {"object": "embedding", "index": i, "embedding": encode_vector(v)}
            for i, v in enumerate(vectors)
        ]
    else:
        items = [
            {"object": "embedding", "index": i, "embedding": v.astype(np.float32, copy=False)}
            for i, v in enumerate(vectors)
        ]
    return orjson.dumps(items, option=orjson.OPT_SERIALIZE_NUMPY)


def _call(request: dict[str, Any]) -> EmbedCall:
    """The request's inputs as the API normalised them: a list of strings or token lists."""
    inputs = request.get("input")
    dims = request.get("dimensions")
    if (
        not isinstance(inputs, list)
        or not all(isinstance(x, str | list) for x in inputs)
        or not (dims is None or isinstance(dims, int))
    ):
        raise InvalidRequest("malformed live embeddings request", param="input")
    return EmbedCall(inputs, dims)


class EmbeddingsLive:
    """``LiveHandler`` for /v1/embeddings: one submission per model and round."""

    def __init__(self, runtime: WorkerRuntime) -> None:
        self.runtime = runtime

    def submit(self, requests: Sequence[dict[str, Any]], sink: StreamSink) -> list[Future[Any]]:
        futures: list[Future[Any]] = [Future() for _ in requests]
        by_model: dict[str, list[tuple[int, EmbedCall]]] = {}
        for n, request in enumerate(requests):
            try:
                by_model.setdefault(str(request.get("model")), []).append((n, _call(request)))
            except LanewayError as exc:
                futures[n].set_exception(exc)
        for model, calls in by_model.items():
            meta = [JobMeta.of(requests[n]) for n, _ in calls]
            try:
                started = self.runtime.engine_as(model, EmbeddingEngine).submit(
                    [c for _, c in calls], lane=LIVE, meta=meta
                )
            except LanewayError as exc:  # e.g. a model this worker does not serve
                for n, _ in calls:
                    futures[n].set_exception(exc)
                continue
            for (n, _), future in zip(calls, started, strict=True):
                futures[n] = future
        return futures

    def encode(self, request: dict[str, Any], result: EmbedResult) -> tuple[bytes, dict[str, Any]]:
        body = data_fragment(result.vectors, str(request.get("encoding_format", "base64")))
        return body, {"usage": {"prompt_tokens": result.prompt_tokens}}


def _embedding_outcome(
    model: str, encoding: str, result: EmbedResult | BaseException, request_id: str
) -> Outcome:
    if isinstance(result, BaseException):
        return Outcome.failed(result, request_id)
    vectors: list[Any] = (
        [encode_vector(v) for v in result.vectors]
        if encoding == "base64"
        else [v.tolist() for v in result.vectors]
    )
    body = embedding_body(model, vectors, result.prompt_tokens)
    return Outcome(200, body, Usage(prompt_tokens=result.prompt_tokens))


def make_engine(runtime: WorkerRuntime, entry: CatalogEntry) -> EmbeddingEngine:
    """The capability registry's entry point for loading a model (off the main thread)."""
    return EmbeddingEngine.load(entry, runtime.settings, device=runtime.device, gone=runtime.gone)


def live_handler(runtime: WorkerRuntime) -> EmbeddingsLive:
    """The capability registry's entry point for live requests."""
    return EmbeddingsLive(runtime)


def batch_executor(runtime: WorkerRuntime) -> Executor:
    """Batch API lines of /v1/embeddings: parsed and checked like the live route, then
    computed together on the batch lane, each request on its own."""
    settings = runtime.settings
    catalog = load_catalog(settings.model_config_path)

    def execute(
        model: str, bodies: list[dict[str, Any]], request_ids: list[str], _owner: str | None
    ) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(bodies)
        parsed: list[tuple[int, str]] = []
        calls: list[EmbedCall] = []
        meta: list[JobMeta] = []
        for n, body in enumerate(bodies):
            try:
                request = parse_body(body)
                served_entry(catalog, settings.models, request.model)
                items = normalise_input(request, settings.max_embedding_inputs)
            except LanewayError as exc:
                outcomes[n] = Outcome.error(exc)
                continue
            parsed.append((n, request.encoding_format))
            calls.append(EmbedCall(items, request.dimensions))
            meta.append(JobMeta.line(request_ids[n]))
        engine = runtime.engine_as(model, EmbeddingEngine)
        results = engine.embed_many(calls, lane=BATCH, meta=meta)
        for (n, encoding), result in zip(parsed, results, strict=True):
            outcomes[n] = _embedding_outcome(model, encoding, result, request_ids[n])
        return [o for o in outcomes if o is not None]

    return execute
