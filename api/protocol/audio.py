"""OpenAI /v1/audio/transcriptions and /translations: the multipart request and the
response models, for the OpenAPI document. The rules are the task contract
(``tasks/contracts/audio.py``); the bodies are built by ``tasks/contracts/audio_bodies.py``."""

from __future__ import annotations

from typing import Any, get_args

from pydantic import BaseModel

from tasks.contracts.audio import Granularity, ResponseFormat


class TranscriptionUsage(BaseModel):
    type: str
    seconds: int


class Transcription(BaseModel):
    """``json``; ``verbose_json`` adds task, language, duration, segments and words."""

    text: str
    usage: TranscriptionUsage | None = None
    task: str | None = None
    language: str | None = None
    duration: float | None = None
    segments: list[dict[str, Any]] | None = None
    words: list[dict[str, Any]] | None = None


def request_body(*, translation: bool) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "file": {
            "type": "string",
            "format": "binary",
            "description": "wav, mp3, m4a, flac, ogg or webm",
        },
        "model": {"type": "string"},
        "prompt": {"type": "string"},
        "temperature": {"type": "number", "minimum": 0, "maximum": 1},
        "response_format": {"type": "string", "enum": list(get_args(ResponseFormat))},
        "stream": {"type": "boolean"},
    }
    if not translation:
        properties["language"] = {"type": "string", "description": "ISO-639-1"}
        properties["timestamp_granularities[]"] = {
            "type": "array",
            "items": {"type": "string", "enum": list(get_args(Granularity))},
        }
    schema = {"type": "object", "required": ["file", "model"], "properties": properties}
    return {
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}
    }


# text, srt and vtt answer plain text; "stream": true answers Server-Sent Events of
# transcript.text.delta and transcript.text.done
RESPONSE_CONTENT: dict[str, Any] = {
    "text/plain": {"schema": {"type": "string"}},
    "text/vtt": {"schema": {"type": "string"}},
    "application/x-subrip": {"schema": {"type": "string"}},
    "text/event-stream": {"schema": {"type": "string", "description": "data: {event}\\n\\n"}},
}
