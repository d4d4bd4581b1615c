"""Rules every capability's wire contract shares: which served model a request names, how
text counts in tokens before it is tokenized, and the shape of the hooks a contract module
declares (``estimate_tokens``, ``ENGINE_COUNTERS``, ``OPTIONS``, ``bench_request``: see
configs/capabilities.py), and what ``laneway benchmark`` sends (``BenchRequest``)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

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


# -- `laneway benchmark`: the request each capability sends (its ``bench_request`` hook) ------

Answer = Mapping[str, Any]
# what a reading takes from an answer (a JSON body, or one streamed chunk): None, not there
Reader = Callable[[Answer], float | None]


def no_reading(answer: Answer) -> float | None:
    """The reader of something an answer does not tell."""
    return None


def number(value: Any) -> float | None:
    """A JSON number as a float (None for anything else, a boolean included)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def usage_of(key: str) -> Reader:
    """The reader of ``usage[key]``, the way every OpenAI-style answer counts its tokens."""

    def read(answer: Answer) -> float | None:
        usage = answer.get("usage")
        value = usage.get(key) if isinstance(usage, Mapping) else None
        return number(value)

    return read


def json_text(answer: Answer) -> str:
    """An answer as compact JSON: the sample a benchmark keeps when nothing shorter says it."""
    return json.dumps(answer, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class BenchRequest:
    """One request of ``laneway benchmark``, as a contract's ``bench_request`` hook makes
    it: the generic load generator sends it and reads the answer only through the readers
    here, so it never needs to know what a capability's bodies look like."""

    path: str  # e.g. "/v1/rerank"
    # what ``units`` counts, per second in the records ("tokens", "completion_tokens", ...)
    unit: str
    # the units an answer counts: read from the JSON body, or from each streamed chunk
    # (the last chunk that tells wins: the one carrying usage)
    units: Reader
    json: dict[str, Any] | None = None  # a JSON body, or
    form: dict[str, str] | None = None  # a multipart form, with
    file: tuple[str, bytes, str] | None = None  # its "file" part: (name, content, type)
    # an SSE stream of JSON chunks: the time to its first chunk with text is the TTFT
    stream: bool = False
    input_tokens: Reader = no_reading  # the tokens the request held, as the answer counts
    output_tokens: Reader = no_reading  # the tokens it generated
    # the answer's text (a stream: what one chunk adds), kept as the run's sample
    text: Callable[[Answer], str] = json_text


# short common English words, each one token for WordPiece and BPE tokenizers alike
_WORDS = (
    "time people year way day man thing woman life child world school state family "
    "student group country problem hand part place case week company system program "
    "question work number night point home water room mother area money story fact month "
    "lot right study book eye job word business issue side kind head house service friend "
    "father power hour game line end member law car city name team minute idea kid body "
    "back parent face level office door health person art war history party result change "
    "morning reason research girl guy moment air teacher force"
)
# what a tokenizer adds around a text (BERT's [CLS] and [SEP])
_SPECIAL_TOKENS = 2


def bench_text(tokens: int, seq: int) -> str:
    """About ``tokens`` tokens of text (specials included, for the common tokenizers),
    different for every ``seq``: a benchmark's requests must not be answered from a cache
    (the embeddings cache) or a prefix cache as repeats. ``seq`` is spelled in words (a
    word a digit, base ``len(words)``), so it costs a token a digit and no two texts are
    alike; the rest are words drawn by a generator seeded with ``seq``, so a run is
    reproducible."""
    words = _WORDS.split()
    digits: list[str] = []
    rest = seq
    while True:
        rest, digit = divmod(rest, len(words))
        digits.append(words[digit])
        if rest == 0:
            break
    fill = max(0, tokens - _SPECIAL_TOKENS - len(digits))
    return " ".join([*reversed(digits), *random.Random(seq).choices(words, k=fill)])
