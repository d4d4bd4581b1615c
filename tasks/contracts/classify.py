"""The classify request contract (``POST /v1/classify``), shared by the API (live calls,
before enqueue) and the workers (Batch API lines): one schema, one set of rules, one
response.

The shape is vLLM's: ``input`` (a string or a list of strings), answered with
``data: [{index, label, probs, num_classes}]`` (``probs`` per class, in the model's class
order; ``label`` the likeliest) and ``usage``. The probabilities are what transformers'
``pipeline("text-classification", top_k=None)`` gives: a softmax over the classes, or a
sigmoid per class for a multi-label model (``problem_type``), none for a regression.
Inputs follow OpenAI's embeddings rules: none empty, at most ``max_inputs`` of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from configs.catalog import Catalog, CatalogEntry, CatalogOptions
from tasks.contracts import base as contract
from tasks.contracts.base import EngineCounter, Rolling, check_count, check_text, text_tokens
from tasks.errors import InvalidRequest, invalid_request

CAPABILITY = "classify"
ENDPOINT = "/v1/classify"

# the scoring engine reports only what every engine does (forwards, waits)
ENGINE_COUNTERS: tuple[EngineCounter, ...] = ()
ROLLING = Rolling(requests=True)  # an item is one input


class ClassifyOptions(CatalogOptions):
    """A classifier's catalog options (``defaults:`` of its entry)."""

    # texts one request may classify at most
    max_inputs: Annotated[StrictInt, Field(ge=1)] = 2048
    # a text over max_input_tokens: False, a 400 naming it; True, cut to the context
    truncate: StrictBool = False
    # the class names in the model's order, for a model whose config names none (its
    # id2label holds only transformers' generic LABEL_0, LABEL_1, ...): without them such
    # a model answers every request with a 400
    labels: tuple[StrictStr, ...] | None = None


OPTIONS = ClassifyOptions


def estimate_tokens(payload: Mapping[str, Any]) -> int:
    """The tokens a live request may use: its texts."""
    return text_tokens(sum(len(t) for t in payload.get("input") or () if isinstance(t, str)))


class ClassificationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    input: StrictStr | list[StrictStr]
    user: StrictStr | None = None


# one pydantic error per member of the union says less than this
FIELD_HINTS = {"input": "Invalid value for 'input': expected a string or a list of strings."}


def parse_body(body: Any) -> ClassificationRequest:
    """A request body (live or a Batch API line's) as a request, or the 400 saying why not."""
    try:
        return ClassificationRequest.model_validate(body)
    except ValidationError as exc:
        raise invalid_request(exc.errors(), FIELD_HINTS) from None


def served_entry(catalog: Catalog, served: list[str], model: str) -> CatalogEntry:
    return contract.served_entry(catalog, served, model, CAPABILITY)


def input_texts(request: ClassificationRequest, entry: CatalogEntry) -> list[str]:
    """The texts to classify, after every rule a request meets before it is tokenized."""
    texts = [request.input] if isinstance(request.input, str) else list(request.input)
    check_count(len(texts), ClassifyOptions.of(entry).max_inputs, "input")
    for i, text in enumerate(texts):
        if not text:
            raise InvalidRequest(f"input[{i}] is empty", param="input")
        check_text(text, f"input[{i}]", "input")
    return texts


def classification_data(
    labels: Sequence[str], probs: Sequence[Sequence[float]]
) -> list[dict[str, Any]]:
    """The response's ``data``: each text's probabilities and its likeliest label."""
    data = []
    for i, row in enumerate(probs):
        best = max(range(len(row)), key=row.__getitem__)
        data.append(
            {
                "index": i,
                "label": labels[best],
                "probs": [float(p) for p in row],
                "num_classes": len(row),
            }
        )
    return data


def classification_body(
    response_id: str, model: str, created: int, data: list[Any], prompt_tokens: int
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "list",
        "created": created,
        "model": model,
        "data": data,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def bench_request(
    model: str, *, input_tokens: int, output_tokens: int, clip: bytes | None, seq: int
) -> contract.BenchRequest:
    """`laneway benchmark`'s request: one text of about ``input_tokens`` tokens, different
    for every ``seq``; input tokens per second, as ``usage.prompt_tokens`` counts them."""
    prompt_tokens = contract.usage_of("prompt_tokens")
    return contract.BenchRequest(
        path=ENDPOINT,
        unit="tokens",
        units=prompt_tokens,
        json={"model": model, "input": contract.bench_text(input_tokens, seq)},
        input_tokens=prompt_tokens,
    )
