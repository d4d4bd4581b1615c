"""The embeddings request contract, shared by the API (live calls, before enqueue) and the
workers (Batch API lines): one schema, one set of rules, one response shape."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from configs.catalog import Catalog, CatalogEntry
from tasks.contracts import base as contract
from tasks.errors import InvalidRequest, invalid_request, register_field_hint

CAPABILITY = "embeddings"
ENDPOINT = "/v1/embeddings"

TokenList = list[StrictInt]
EmbeddingInput = StrictStr | list[StrictStr] | TokenList | list[TokenList]


# one pydantic error per member of the union says less than this
register_field_hint(
    "input",
    "Invalid value for 'input': expected a string, a list of strings, a list of token ids "
    "(integers) or a list of such lists.",
)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: EmbeddingInput
    model: StrictStr
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[StrictInt, Field(ge=1)] | None = None
    user: StrictStr | None = None


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
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate (JSON "\ud800") breaks tokenizers
                raise InvalidRequest(
                    f"input[{i}] is not valid Unicode text (it holds a lone surrogate)",
                    param="input",
                ) from None
    return items


def served_entry(catalog: Catalog, served: list[str], model: str) -> CatalogEntry:
    return contract.served_entry(catalog, served, model, CAPABILITY)


def check_dimensions(entry: CatalogEntry, dimensions: int | None) -> None:
    """The one rule for `dimensions`: only the sizes a Matryoshka model was trained for."""
    if dimensions is None or dimensions == entry.dimensions:
        return
    if not entry.supports_dimensions:
        raise InvalidRequest(
            f"model {entry.id!r} does not support the 'dimensions' parameter",
            param="dimensions",
        )
    if dimensions not in entry.matryoshka_dims:
        allowed = ", ".join(str(d) for d in entry.matryoshka_dims)
        raise InvalidRequest(
            f"model {entry.id!r} supports dimensions {allowed}; got {dimensions}",
            param="dimensions",
        )


def parse_body(body: Any) -> EmbeddingRequest:
    """A Batch API line's body as a request, with the same messages as the live route."""
    try:
        return EmbeddingRequest.model_validate(body)
    except ValidationError as exc:
        raise invalid_request(exc.errors()) from None


def embedding_body(
    model: str, embeddings: Sequence[list[float] | str], prompt_tokens: int
) -> dict[str, Any]:
    """The OpenAI response body for already-encoded embeddings (floats or base64)."""
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(embeddings)
        ],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
