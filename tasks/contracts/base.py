"""Rules every capability's wire contract shares: which served model a request names, how
text counts in tokens before it is tokenized, and the shape of the hooks a contract module
declares (``estimate_tokens``, ``ENGINE_COUNTERS``, ``OPTIONS``: see configs/capabilities.py)."""

from __future__ import annotations

from typing import NamedTuple

from configs.catalog import Catalog, CatalogEntry
from tasks.errors import InvalidRequest, ModelNotFound, quote

CHARS_PER_TOKEN = 4  # OpenAI's rule of thumb for English text


def text_tokens(chars: int) -> int:
    """The tokens ``chars`` characters of text count for before tokenizing (rounded up)."""
    return -(-chars // CHARS_PER_TOKEN)


class EngineCounter(NamedTuple):
    """A counter a capability's worker engine reports in its ``metrics()`` snapshot, which
    the API's ``/metrics`` renders as a Prometheus counter by model and worker."""

    key: str  # the snapshot key
    name: str  # the Prometheus counter's name, without ``_total``
    help: str


class Rolling(NamedTuple):
    """A contract's ``ROLLING`` hook: what its engine's ``metrics()`` snapshot gives the
    rolling benchmark records (workers/rolling.py)."""

    # each forward item is a request (one input): items per second are requests per second
    requests: bool
    # the snapshot counter of the capability's unit, and the unit records call it
    unit_key: str | None = None
    unit: str | None = None


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


def check_text(text: str, where: str, param: str) -> None:
    """A lone surrogate (JSON ``"\\ud800"``) breaks tokenizers: a 400 naming ``where``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(
            f"{where} is not valid Unicode text (it holds a lone surrogate)", param=param
        ) from None


def check_count(count: int, most: int, param: str) -> None:
    """A request's list of texts: not empty, and at most ``most`` of them."""
    if count == 0:
        raise InvalidRequest(f"'{param}' must not be empty", param=param)
    if count > most:
        raise InvalidRequest(
            f"'{param}' has {count} items; at most {most} are allowed for this model",
            param=param,
        )
