"""/v1/embeddings: validate, enqueue on the live lane, shape the answer."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from api.live import LiveClient
from api.protocol.embeddings import EmbeddingRequest
from configs.catalog import Catalog, CatalogEntry
from configs.settings import Settings
from tasks.embeddings import CAPABILITY, check_dimensions, decode_vector
from tasks.errors import InvalidRequest, ModelNotFound


def normalise_input(request: EmbeddingRequest, max_items: int) -> list[str | list[int]]:
    """A list of strings or token lists, with OpenAI's rules on emptiness and count."""
    raw = request.input
    items: list[str | list[int]]
    if isinstance(raw, str):
        items = [raw]
    elif raw and all(isinstance(x, int) for x in raw):
        items = [list(raw)]  # type: ignore[arg-type]
    else:
        items = list(raw)  # type: ignore[arg-type]
    if not items:
        raise InvalidRequest("'input' must not be empty", param="input")
    if len(items) > max_items:
        raise InvalidRequest(
            f"'input' has {len(items)} items; at most {max_items} are allowed", param="input"
        )
    for i, item in enumerate(items):
        if len(item) == 0:
            raise InvalidRequest(f"input[{i}] is empty", param="input")
    return items


def served_entry(catalog: Catalog, served: list[str], model: str) -> CatalogEntry:
    if model not in served:
        raise ModelNotFound(
            f"The model {model!r} does not exist or is not served here; served: "
            f"{', '.join(served)}",
            param="model",
        )
    entry = catalog.get(model)
    if entry.capability != CAPABILITY:
        raise InvalidRequest(
            f"model {model!r} is a {entry.capability} model, not an embeddings model",
            param="model",
        )
    return entry


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
    as_b64 = request.encoding_format == "base64"
    data = [
        {"object": "embedding", "index": i, "embedding": v if as_b64 else decode_vector(v)}
        for i, v in enumerate(reply["data"])
    ]
    tokens = int(reply["prompt_tokens"])
    return {
        "object": "list",
        "data": data,
        "model": request.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
