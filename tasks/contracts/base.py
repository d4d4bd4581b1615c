"""Rules every capability's wire contract shares: which served model a request names."""

from __future__ import annotations

from configs.catalog import Catalog, CatalogEntry
from tasks.errors import InvalidRequest, ModelNotFound, quote


def with_article(word: str) -> str:
    """``word`` with its indefinite article ("an embeddings", "a chat")."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


def served_entry(catalog: Catalog, served: list[str], model: str, capability: str) -> CatalogEntry:
    """The catalog entry ``model`` names (by id or alias): 404 when it is not served here,
    400 when it serves another capability than the route it was sent to."""
    entry = catalog.find(model)
    if entry is None or entry.id not in served:
        raise ModelNotFound(
            f"The model {quote(model)} does not exist or is not served here; served: "
            f"{', '.join(catalog.names(served))}",
            param="model",
        )
    if entry.capability != capability:
        raise InvalidRequest(
            f"model {quote(model)} is {with_article(entry.capability)} model, "
            f"not {with_article(capability)} model",
            param="model",
        )
    return entry
