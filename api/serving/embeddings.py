"""/v1/embeddings: validate, enqueue on the live lane, shape the answer."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from api.live import LiveClient
from configs.catalog import Catalog
from configs.settings import Settings
from tasks.embeddings import (
    CAPABILITY,
    EmbeddingRequest,
    check_dimensions,
    embedding_response,
    normalise_input,
    served_entry,
)

__all__ = ["create_embeddings", "normalise_input", "served_entry"]


async def create_embeddings(
    request: EmbeddingRequest,
    *,
    settings: Settings,
    catalog: Catalog,
    live: LiveClient,
    disconnected: Callable[[], Awaitable[Any]] | None = None,
) -> dict[str, Any]:
    entry = served_entry(catalog, settings.models, request.model)
    check_dimensions(entry, request.dimensions)
    items = normalise_input(request, settings.max_embedding_inputs)
    reply = await live.call(
        CAPABILITY,
        {"model": request.model, "input": items, "dimensions": request.dimensions},
        disconnected=disconnected,
    )
    return embedding_response(
        request.model, reply["data"], int(reply["prompt_tokens"]), request.encoding_format
    )
