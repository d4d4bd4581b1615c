"""What a transcription or translation answers, in each of OpenAI's response formats, and
the events of a streamed one. Built from the worker's result, whose segments are dicts:
``start``, ``end`` (seconds), ``text`` (with Whisper's leading space), ``tokens``,
``temperature``, ``avg_logprob``, ``compression_ratio``, ``no_speech_prob`` and
``words`` (``word``, ``start``, ``end``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import orjson

from tasks.contracts.audio import MEDIA_TYPES
from tasks.contracts.audio_languages import LANGUAGES
from tasks.store.usage import Usage

Segments = Sequence[dict[str, Any]]


def transcript_text(segments: Segments) -> str:
    return "".join(str(s["text"]) for s in segments).strip()


def usage_body(duration: float) -> dict[str, Any]:
    """OpenAI bills whisper-1 by whole seconds of audio."""
    return {"type": "duration", "seconds": math.ceil(duration)}


def usage(duration: float) -> Usage:
    return Usage(audio_seconds=float(duration))


def json_body(result: dict[str, Any]) -> dict[str, Any]:
    return {"text": transcript_text(result["segments"]), "usage": usage_body(result["duration"])}


def _segment(n: int, seg: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": n,
        "seek": round(float(seg["start"]) * 100),
        "start": float(seg["start"]),
        "end": float(seg["end"]),
        "text": str(seg["text"]),
        "tokens": list(seg.get("tokens") or []),
        "temperature": float(seg.get("temperature", 0.0)),
        "avg_logprob": float(seg.get("avg_logprob", 0.0)),
        "compression_ratio": float(seg.get("compression_ratio", 0.0)),
        "no_speech_prob": float(seg.get("no_speech_prob", 0.0)),
    }


def verbose_body(work: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """``verbose_json``: segments unless only ``word`` granularity was asked, words when
    it was."""
    segments = result["segments"]
    language = str(result.get("language") or "")
    body: dict[str, Any] = {
        "task": work["task"],
        "language": LANGUAGES.get(language, language),
        "duration": round(float(result["duration"]), 3),
        "text": transcript_text(segments),
    }
    if work.get("segments", True):
        body["segments"] = [_segment(n, s) for n, s in enumerate(segments)]
    if work.get("words"):
        body["words"] = [
            {"word": str(w["word"]).strip(), "start": float(w["start"]), "end": float(w["end"])}
            for s in segments
            for w in s.get("words") or ()
        ]
    body["usage"] = usage_body(result["duration"])
    return body


def _clock(seconds: float, sep: str) -> str:
    ms = max(0, round(seconds * 1000))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def srt(segments: Segments) -> str:
    cues = [
        f"{n}\n{_clock(s['start'], ',')} --> {_clock(s['end'], ',')}\n{str(s['text']).strip()}\n"
        for n, s in enumerate(segments, 1)
    ]
    return "\n".join(cues)


def vtt(segments: Segments) -> str:
    cues = [
        f"{_clock(s['start'], '.')} --> {_clock(s['end'], '.')}\n{str(s['text']).strip()}\n"
        for s in segments
    ]
    return "WEBVTT\n\n" + "\n".join(cues)


def render(work: dict[str, Any], result: dict[str, Any]) -> tuple[bytes, str]:
    """The response body in the request's ``response_format``, and its media type."""
    fmt = str(work.get("response_format", "json"))
    segments = result["segments"]
    if fmt == "text":
        body = (transcript_text(segments) + "\n").encode()
    elif fmt == "srt":
        body = srt(segments).encode()
    elif fmt == "vtt":
        body = vtt(segments).encode()
    elif fmt == "verbose_json":
        body = orjson.dumps(verbose_body(work, result))
    else:
        body = orjson.dumps(json_body(result))
    return body, MEDIA_TYPES[fmt]


def outcome_body(work: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """A Batch API line's body (``json`` or ``verbose_json``)."""
    if work.get("response_format") == "verbose_json":
        return verbose_body(work, result)
    return json_body(result)


def delta_event(delta: str) -> bytes:
    return _event({"type": "transcript.text.delta", "delta": delta})


def done_event(text: str, duration: float) -> bytes:
    return _event({"type": "transcript.text.done", "text": text, "usage": usage_body(duration)})


def _event(body: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\n\n"
