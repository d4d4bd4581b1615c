"""/v1/embeddings: parse and validate, enqueue on the live lane, shape the answer.

The hot path builds no pydantic model and decodes no vector: a body in the common shape
(a string or a list of strings, the documented fields with their documented types) is
checked by hand; anything else goes through ``EmbeddingRequest`` so that every bad
request gets the message the Batch API gives the same body. The worker's reply carries
the ``data`` array already encoded as asked, and the answer is that array spliced into
the rest of the response.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from api.live import LiveClient
from api.serving import load_json
from configs.catalog import Catalog
from configs.settings import Settings
from tasks.contracts.embeddings import (
    CAPABILITY,
    EmbeddingRequest,
    check_dimensions,
    normalise_input,
    parse_body,
    served_entry,
)

__all__ = ["create_embeddings", "normalise_input", "parse_request", "served_entry"]

_FIELDS = frozenset({"input", "model", "encoding_format", "dimensions", "user"})


def _fast(body: Any) -> EmbeddingRequest | None:
    """``body`` as a request when it has the common shape for sure (None: not sure)."""
    if type(body) is not dict:
        return None
    text = body.get("input")
    model = body.get("model")
    encoding = body.get("encoding_format", "float")
    dims = body.get("dimensions")
    user = body.get("user")
    if (
        type(model) is not str
        or encoding not in ("float", "base64")
        or not (dims is None or (type(dims) is int and dims >= 1))
        or not (user is None or type(user) is str)
        or not (type(text) is str or (type(text) is list and all(type(t) is str for t in text)))
    ):
        return None
    fields = {k: body[k] for k in _FIELDS if k in body}
    return EmbeddingRequest.model_construct(**fields)


def parse_request(raw: bytes) -> EmbeddingRequest:
    body, strict = load_json(raw)
    if strict:
        request = _fast(body)
        if request is not None:
            return request
    return parse_body(body)


async def create_embeddings(
    request: EmbeddingRequest,
    *,
    settings: Settings,
    catalog: Catalog,
    live: LiveClient,
    disconnected: Callable[[], Awaitable[Any]] | None = None,
) -> bytes:
    """The response body, as bytes."""
    entry = served_entry(catalog, settings.models, request.model)
    check_dimensions(entry, request.dimensions)
    items = normalise_input(request, settings.max_embedding_inputs)
    reply = await live.call(
        CAPABILITY,
        {
            "model": entry.id,
            "input": items,
            "dimensions": request.dimensions,
            "encoding_format": request.encoding_format,
        },
        disconnected=disconnected,
    )
    tokens = int(reply.header.get("usage", {}).get("prompt_tokens", 0))
    return b"".join(
        (
            b'{"object":"list","data":',
            reply.body,
            b',"model":',
            orjson.dumps(request.model),
            b',"usage":{"prompt_tokens":%d,"total_tokens":%d}}' % (tokens, tokens),
        )
    )
