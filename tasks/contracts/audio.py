"""The audio (speech-to-text) contract, shared by the API (live multipart calls) and the
workers (Batch API lines): one set of rules, one work payload.

Live calls send the audio as a multipart upload, which the API stores in the file store
and passes on as a reference (``{"key": ...}``); Batch API lines, our extension, name a
file uploaded with purpose ``user_data`` (``"file": "file-..."``). The audio itself never
travels in a Redis message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from configs.catalog import Catalog, CatalogEntry, CatalogOptions
from tasks.contracts import base as contract
from tasks.contracts.audio_languages import LANGUAGES
from tasks.contracts.base import EngineCounter, Rolling
from tasks.errors import InvalidRequest, PayloadTooLarge, invalid_request, quote

CAPABILITY = "audio"
TRANSCRIPTIONS = "/v1/audio/transcriptions"
TRANSLATIONS = "/v1/audio/translations"
TASKS = {TRANSCRIPTIONS: "transcribe", TRANSLATIONS: "translate"}
MAX_PROMPT_CHARS = 4096  # Whisper keeps the last 223 tokens of it anyway

ResponseFormat = Literal["json", "text", "srt", "vtt", "verbose_json"]
Granularity = Literal["segment", "word"]
MEDIA_TYPES: dict[str, str] = {
    "json": "application/json",
    "verbose_json": "application/json",
    "text": "text/plain; charset=utf-8",
    "srt": "application/x-subrip; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
}
STREAM_FORMATS = ("json", "text")
BATCH_FORMATS = ("json", "verbose_json")  # a batch output line's body is JSON

# what the speech engine reports in its metrics() snapshot (workers/audio_engine.py)
ENGINE_COUNTERS = (
    EngineCounter("audio_seconds", "laneway_audio_seconds", "Seconds of audio transcribed"),
)
# a forward is a segment or a batch of clips: seconds of audio measure it
ROLLING = Rolling(requests=False, unit_key="audio_seconds", unit="audio_seconds")

PositiveInt = Annotated[StrictInt, Field(ge=1)]


class AudioOptions(CatalogOptions):
    """A speech model's catalog options (``defaults:`` of its entry), its backends' knobs."""

    english_only: StrictBool = False  # a language other than en is refused
    # short clips of several requests in one forward at most (1: no batching)
    batch_size: PositiveInt = 8
    # beams at temperature 0 (none given: the backend's, faster-whisper 5, transformers 1)
    beam_size: PositiveInt | None = None
    compute_type: StrictStr | None = None  # CTranslate2's (none: float16 on CUDA, else int8)
    max_new_tokens: PositiveInt | None = None  # tokens per 30 s window (transformers)


OPTIONS = AudioOptions


def estimate_tokens(payload: Mapping[str, Any]) -> int:
    """Nothing: what audio costs (its tokens or seconds) is known only once it is decoded
    and transcribed, and is charged when the answer is in; the prompt is a hint to the
    decoder, not text to be charged for, and the audio is a reference to a stored file."""
    return 0


class AudioRequest(BaseModel):
    """The fields of both endpoints (a live form's values are strings: lax parsing turns
    ``"0.2"`` into 0.2 and ``"true"`` into True)."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    language: StrictStr | None = None
    prompt: StrictStr | None = None
    temperature: Annotated[float, Field(ge=0, le=1)] = 0.0
    response_format: ResponseFormat = "json"
    timestamp_granularities: list[Granularity] = Field(default_factory=list)
    stream: bool = False


class BatchAudioRequest(AudioRequest):
    """A Batch API line's body: the audio is a file uploaded with purpose ``user_data``."""

    file: StrictStr


def _validated(cls: type[AudioRequest], data: Mapping[str, Any]) -> AudioRequest:
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise invalid_request(exc.errors()) from None


def parse_form(fields: Mapping[str, Any]) -> AudioRequest:
    """A live call's form fields (``file`` apart). ``timestamp_granularities[]`` may repeat
    (what the openai client sends); empty values count as absent."""
    data: dict[str, Any] = {k: v for k, v in fields.items() if v != ""}
    grains = data.pop("timestamp_granularities[]", None)
    if grains is not None:
        data["timestamp_granularities"] = grains if isinstance(grains, list) else [grains]
    elif isinstance(data.get("timestamp_granularities"), str):
        data["timestamp_granularities"] = [data["timestamp_granularities"]]
    if "model" not in data:
        raise InvalidRequest("Missing required parameter: 'model'.", param="model")
    return _validated(AudioRequest, data)


def parse_body(body: Any) -> BatchAudioRequest:
    """A Batch API line's body."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object", param="body")
    request = _validated(BatchAudioRequest, body)
    assert isinstance(request, BatchAudioRequest)
    if request.stream:
        raise InvalidRequest("'stream' is not supported in a batch", param="stream")
    if request.response_format not in BATCH_FORMATS:
        raise InvalidRequest(
            f"response_format {request.response_format!r} is not supported in a batch (its "
            f"output lines carry JSON): use one of {', '.join(BATCH_FORMATS)}",
            param="response_format",
        )
    return request


def too_large(max_bytes: int) -> PayloadTooLarge:
    """An audio file over ``LANEWAY_AUDIO_MAX_BYTES``: a live upload's 413, and the same
    error on a Batch API line whose ``user_data`` file is that large."""
    return PayloadTooLarge(
        f"The audio file is larger than the limit of {max_bytes} bytes", param="file"
    )


def served_entry(catalog: Catalog, served: list[str], model: str) -> CatalogEntry:
    return contract.served_entry(catalog, served, model, CAPABILITY)


def check(request: AudioRequest, entry: CatalogEntry, task: str) -> None:
    """The rules beyond the schema (OpenAI's, and what the model can do)."""
    if "word" in request.timestamp_granularities and request.response_format != "verbose_json":
        raise InvalidRequest(
            "timestamp_granularities 'word' requires response_format 'verbose_json'",
            param="timestamp_granularities",
        )
    if request.stream and request.response_format not in STREAM_FORMATS:
        raise InvalidRequest(
            f"'stream' is supported with response_format {' or '.join(STREAM_FORMATS)}, "
            f"not {request.response_format!r}",
            param="stream",
        )
    if request.prompt is not None and len(request.prompt) > MAX_PROMPT_CHARS:
        raise InvalidRequest(
            f"'prompt' is {len(request.prompt)} characters; at most {MAX_PROMPT_CHARS}",
            param="prompt",
        )
    language = request.language
    if language is not None:
        if language.lower() not in LANGUAGES:
            raise InvalidRequest(
                f"language {quote(language)} is not an ISO-639-1 code Whisper knows "
                "(e.g. 'en', 'de', 'ja')",
                param="language",
            )
        if english_only(entry) and language.lower() != "en":
            raise InvalidRequest(
                f"model {entry.id!r} is English-only; it cannot take language {language!r}",
                param="language",
            )


def english_only(entry: CatalogEntry) -> bool:
    return AudioOptions.of(entry).english_only


def to_work(
    request: AudioRequest, entry: CatalogEntry, task: str, audio: dict[str, str]
) -> dict[str, Any]:
    """The normalised, JSON-able work payload: ``audio`` is ``{"key": <file store key>}``
    (and ``"delete": True`` when the worker owns the copy)."""
    check(request, entry, task)
    grains = set(request.timestamp_granularities)
    return {
        "model": entry.id,  # an alias resolved: workers know ids
        "audio": audio,
        "task": task,
        "language": request.language.lower() if request.language else None,
        "prompt": request.prompt or None,
        "temperature": float(request.temperature),
        "words": "word" in grains,
        "response_format": request.response_format,
        "segments": "segment" in grains or not grains,
        "stream": request.stream,
    }


# -- `laneway benchmark` ---------------------------------------------------------------------


def _duration(answer: contract.Answer) -> float | None:
    """The seconds of audio a ``verbose_json`` answer transcribed (to the millisecond;
    ``usage.seconds`` is rounded up to whole seconds, as OpenAI bills)."""
    return contract.number(answer.get("duration"))


def _transcript(answer: contract.Answer) -> str:
    text = answer.get("text")
    return text if isinstance(text, str) else contract.json_text(answer)


def bench_request(
    model: str, *, input_tokens: int, output_tokens: int, clip: bytes | None, seq: int
) -> contract.BenchRequest:
    """`laneway benchmark`'s request: the clip, transcribed as ``verbose_json`` (its
    ``duration`` is the seconds of audio); seconds of audio per second. Text lengths do
    not apply; the same clip every time is fine (no cache keeps transcripts)."""
    if clip is None:
        raise ValueError("a speech benchmark needs a clip (a WAV file)")
    return contract.BenchRequest(
        path=TRANSCRIPTIONS,
        unit="audio_seconds",
        units=_duration,
        form={"model": model, "response_format": "verbose_json"},
        file=(f"clip{seq}.wav", clip, "audio/wav"),
        text=_transcript,
    )
