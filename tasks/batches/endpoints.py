"""Which endpoints a batch may name, and the capability that serves each.

A capability adds its own with ``register_endpoint``."""

from __future__ import annotations

from tasks import embeddings

BATCH_ENDPOINTS: dict[str, str] = {}


def register_endpoint(endpoint: str, capability: str) -> None:
    BATCH_ENDPOINTS[endpoint] = capability


# the one capability so far; the capability registry (chat issue) will register its own
register_endpoint(embeddings.ENDPOINT, embeddings.CAPABILITY)
