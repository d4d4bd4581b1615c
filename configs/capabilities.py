"""The capability registry: one entry per capability, naming the module of each layer.

A capability is one module per layer (``api/routes/<cap>.py`` with the protocol and
serving modules it uses, ``tasks/<cap>.py`` for the wire contract and batch bodies,
``workers/<cap>.py`` for the worker-side handler, ``workers/backends/<cap>*.py``) and one
entry here. The API app, the Celery app and its lanes, the batch engine's endpoints, the
worker, the catalog and ``/metrics`` iterate this registry; no generic module names a
capability. Modules are named, not imported, so that every process imports only its own
layer (the API never imports ``workers/``, hence never torch).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Capability:
    name: str
    # the OpenAI routes a Batch API line may name for this capability
    batch_endpoints: tuple[str, ...]
    # the backend of a catalog entry that names none ("module:Class")
    default_backend: str
    # the wire contract (tasks/): request schema, batch body parsing, usage; importing it
    # registers what it adds to generic modules (error hints). Its hooks, which generic code
    # reads through this registry: ``estimate_tokens(payload)`` (api/limits.py),
    # ``ENGINE_COUNTERS`` (api/metrics.py), ``OPTIONS`` (configs/catalog.py, /v1/models),
    # ``bench_request(model, *, input_tokens, output_tokens, clip, seq)`` (`laneway
    # benchmark`, laneway/benchmark_cli/): the ``tasks.contracts.base.BenchRequest`` one
    # benchmark request sends (path, body or form, streamed or not) and how its answer
    # counts (the unit per second: input tokens, completion tokens, seconds of audio),
    # ``ROLLING`` (workers/rolling.py): what the engine's metrics give rolling records
    contract: str
    # the API's router module: ``router`` (FastAPI), optionally ``DIRECT`` (api/direct.py)
    api_routes: str
    # the worker-side module: ``make_engine(runtime, entry)`` (one warm model and its
    # scheduler), ``live_handler(runtime)`` and ``batch_executor(runtime)``
    worker: str

    def contract_module(self) -> ModuleType:
        return importlib.import_module(self.contract)

    def api_module(self) -> ModuleType:
        return importlib.import_module(self.api_routes)

    def worker_module(self) -> ModuleType:
        return importlib.import_module(self.worker)


REGISTRY: dict[str, Capability] = {
    c.name: c
    for c in (
        Capability(
            name="embeddings",
            batch_endpoints=("/v1/embeddings",),
            default_backend="workers.backends.embeddings:TransformersEmbeddingBackend",
            contract="tasks.contracts.embeddings",
            api_routes="api.routes.embeddings",
            worker="workers.embeddings",
        ),
        Capability(
            name="chat",
            batch_endpoints=("/v1/chat/completions",),
            default_backend="workers.backends.chat:TransformersChatBackend",
            contract="tasks.contracts.chat",
            api_routes="api.routes.chat",
            worker="workers.chat",
        ),
        Capability(
            name="audio",
            # our extension: OpenAI's Batch API has no audio endpoints
            batch_endpoints=("/v1/audio/transcriptions",),
            default_backend="workers.backends.audio_faster_whisper:FasterWhisperBackend",
            contract="tasks.contracts.audio",
            api_routes="api.routes.audio",
            worker="workers.audio",
        ),
        Capability(
            name="rerank",
            # vLLM's and Jina's; OpenAI has none
            batch_endpoints=("/v1/rerank",),
            default_backend="workers.backends.rerank:CrossEncoderBackend",
            contract="tasks.contracts.rerank",
            api_routes="api.routes.rerank",
            worker="workers.rerank",
        ),
        Capability(
            name="classify",
            # vLLM's; OpenAI has none
            batch_endpoints=("/v1/classify",),
            default_backend="workers.backends.classify:ClassifierBackend",
            contract="tasks.contracts.classify",
            api_routes="api.routes.classify",
            worker="workers.classify",
        ),
    )
}
CAPABILITIES: tuple[str, ...] = tuple(REGISTRY)
