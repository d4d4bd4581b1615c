"""The embeddings request contract, shared by the API (live calls, before enqueue) and the
workers (Batch API lines): one schema, one set of rules, one response shape."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from configs.catalog import Catalog, CatalogEntry, CatalogOptions
from tasks.contracts import base as contract
from tasks.contracts.base import EngineCounter, Rolling, text_tokens
from tasks.errors import InvalidRequest, invalid_request

CAPABILITY = "embeddings"
ENDPOINT = "/v1/embeddings"

# what the embeddings engine reports in its metrics() snapshot (workers/embeddings_engine.py)
ENGINE_COUNTERS = (
    EngineCounter("cache_hits", "laneway_embedding_cache_hits", "Embedding cache hits"),
    EngineCounter("cache_misses", "laneway_embedding_cache_misses", "Embedding cache misses"),
)
ROLLING = Rolling(requests=True)  # an item is one input

Dimension = Annotated[StrictInt, Field(ge=1)]


class EmbeddingsOptions(CatalogOptions):
    """An embeddings model's catalog options (``defaults:`` of its entry)."""

    dimensions: Dimension | None = None  # the output size
    # the sizes a request's ``dimensions`` may ask for (a Matryoshka model's)
    matryoshka_dims: tuple[Dimension, ...] = ()
    # the ONNX backend's weights: int8-quantized ones
    quantize: Literal["int8"] | None = None

    @model_validator(mode="after")
    def _own_size_is_allowed(self) -> Self:
        dims = self.matryoshka_dims
        if dims and self.dimensions is not None and self.dimensions not in dims:
            raise ValueError(
                f"dimensions ({self.dimensions}) must be one of matryoshka_dims "
                f"({', '.join(str(d) for d in dims)})"
            )
        return self

    def public(self) -> dict[str, Any]:
        return {"dimensions": self.dimensions} if self.dimensions is not None else {}


OPTIONS = EmbeddingsOptions


def estimate_tokens(payload: Mapping[str, Any]) -> int:
    """The tokens a live request may use: its texts at ``CHARS_PER_TOKEN`` characters a
    token (rounded up once, over all of them), token ids one each."""
    chars = ids = 0
    for item in payload.get("input") or ():  # strings or token-id lists
        if isinstance(item, str):
            chars += len(item)
        else:
            ids += len(item)
    return ids + text_tokens(chars)


TokenList = list[StrictInt]
EmbeddingInput = StrictStr | list[StrictStr] | TokenList | list[TokenList]


# one pydantic error per member of the union says less than this
FIELD_HINTS = {
    "input": "Invalid value for 'input': expected a string, a list of strings, a list of "
    "token ids (integers) or a list of such lists.",
}


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
    options = EmbeddingsOptions.of(entry)
    if dimensions is None or dimensions == options.dimensions:
        return
    if not options.matryoshka_dims:
        raise InvalidRequest(
            f"model {entry.id!r} does not support the 'dimensions' parameter",
            param="dimensions",
        )
    if dimensions not in options.matryoshka_dims:
        allowed = ", ".join(str(d) for d in options.matryoshka_dims)
        raise InvalidRequest(
            f"model {entry.id!r} supports dimensions {allowed}; got {dimensions}",
            param="dimensions",
        )


def parse_body(body: Any) -> EmbeddingRequest:
    """A Batch API line's body as a request, with the same messages as the live route."""
    try:
        return EmbeddingRequest.model_validate(body)
    except ValidationError as exc:
        raise invalid_request(exc.errors(), FIELD_HINTS) from None


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


def _vector_text(answer: Mapping[str, Any]) -> str:
    """A vector's first values and its size: the whole of it says nothing to a reader."""
    data = answer.get("data") or [{}]
    vector = data[0].get("embedding") if isinstance(data[0], dict) else None
    if not isinstance(vector, list):
        return contract.json_text(answer)
    head = ", ".join(f"{x:.4f}" for x in vector[:8] if isinstance(x, int | float))
    return f"[{head}, ...] ({len(vector)} dimensions)"


def bench_request(
    model: str, *, input_tokens: int, output_tokens: int, clip: bytes | None, seq: int
) -> contract.BenchRequest:
    """`laneway benchmark`'s request: one text of about ``input_tokens`` tokens, different
    for every ``seq`` (the engine's cache must not answer repeats); input tokens per
    second, as ``usage.prompt_tokens`` counts them."""
    prompt_tokens = contract.usage_of("prompt_tokens")
    return contract.BenchRequest(
        path=ENDPOINT,
        unit="tokens",
        units=prompt_tokens,
        json={
            "model": model,
            "input": contract.bench_text(input_tokens, seq),
            "encoding_format": "float",
        },
        input_tokens=prompt_tokens,
        text=_vector_text,
    )
