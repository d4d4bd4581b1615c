"""What a transcription answers in each response format (``tasks/contracts/audio_bodies.py``)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tasks.contracts import audio_bodies as bodies

SEGMENTS: list[dict[str, Any]] = [
    {
        "start": 0.0,
        "end": 1.25,
        "text": " Hello there.",
        "tokens": [50363, 2425, 612],
        "temperature": 0.0,
        "avg_logprob": -0.25,
        "compression_ratio": 0.9,
        "no_speech_prob": 0.01,
        "words": [
            {"word": " Hello", "start": 0.0, "end": 0.5},
            {"word": " there.", "start": 0.5, "end": 1.25},
        ],
    },
    {
        "start": 1.25,
        "end": 3.5,
        "text": " General Kenobi.",
        "tokens": [3611],
        "temperature": 0.2,
        "avg_logprob": -0.5,
        "compression_ratio": 1.1,
        "no_speech_prob": 0.02,
        "words": [
            {"word": " General", "start": 1.25, "end": 2.0},
            {"word": " Kenobi.", "start": 2.0, "end": 3.5},
        ],
    },
]
RESULT: dict[str, Any] = {"language": "en", "duration": 3.6004, "segments": SEGMENTS}


def work(fmt: str = "json", **kw: Any) -> dict[str, Any]:
    return {"task": "transcribe", "response_format": fmt, "segments": True, "words": False, **kw}


def test_srt() -> None:
    assert bodies.srt(SEGMENTS) == (
        "1\n00:00:00,000 --> 00:00:01,250\nHello there.\n"
        "\n"
        "2\n00:00:01,250 --> 00:00:03,500\nGeneral Kenobi.\n"
    )


def test_vtt() -> None:
    assert bodies.vtt(SEGMENTS) == (
        "WEBVTT\n\n"
        "00:00:00.000 --> 00:00:01.250\nHello there.\n"
        "\n"
        "00:00:01.250 --> 00:00:03.500\nGeneral Kenobi.\n"
    )


def test_clock_past_an_hour() -> None:
    long = [{"start": 3725.5, "end": 3727.0, "text": " Late."}]
    assert bodies.srt(long) == "1\n01:02:05,500 --> 01:02:07,000\nLate.\n"
    assert bodies.vtt(long) == "WEBVTT\n\n01:02:05.500 --> 01:02:07.000\nLate.\n"


@pytest.mark.parametrize(
    ("seconds", "srt_clock"),
    [
        (0.0, "00:00:00,000"),
        (0.0004, "00:00:00,000"),
        (0.9996, "00:00:01,000"),  # rounding carries into the seconds
        (59.9999, "00:01:00,000"),
        (61.001, "00:01:01,001"),
        (36000.0, "10:00:00,000"),
        (-0.5, "00:00:00,000"),
    ],
)
def test_clock_rounding(seconds: float, srt_clock: str) -> None:
    cue = bodies.srt([{"start": seconds, "end": seconds, "text": "x"}])
    assert cue == f"1\n{srt_clock} --> {srt_clock}\nx\n"


def test_empty_transcript() -> None:
    assert bodies.srt([]) == ""
    assert bodies.vtt([]) == "WEBVTT\n\n"
    empty = {"language": "en", "duration": 0.4, "segments": []}
    assert bodies.render(work("text"), empty)[0] == b"\n"
    assert bodies.json_body(empty) == {"text": "", "usage": {"type": "duration", "seconds": 1}}


def test_text_ends_with_one_newline() -> None:
    body, media = bodies.render(work("text"), RESULT)
    assert body == b"Hello there. General Kenobi.\n"
    assert media == "text/plain; charset=utf-8"


def test_json_body() -> None:
    assert bodies.json_body(RESULT) == {
        "text": "Hello there. General Kenobi.",
        "usage": {"type": "duration", "seconds": 4},
    }
    whole = {**RESULT, "duration": 3.0}
    assert bodies.json_body(whole)["usage"] == {"type": "duration", "seconds": 3}


def test_usage() -> None:
    assert bodies.usage_body(0.01) == {"type": "duration", "seconds": 1}
    assert bodies.usage(3.6)["audio_seconds"] == pytest.approx(3.6)


def test_verbose_json() -> None:
    body = bodies.verbose_body(work("verbose_json"), RESULT)
    assert body["task"] == "transcribe"
    assert body["language"] == "english"
    assert body["duration"] == 3.6
    assert body["text"] == "Hello there. General Kenobi."
    assert body["usage"] == {"type": "duration", "seconds": 4}
    assert "words" not in body
    assert body["segments"] == [
        {
            "id": 0,
            "seek": 0,
            "start": 0.0,
            "end": 1.25,
            "text": " Hello there.",
            "tokens": [50363, 2425, 612],
            "temperature": 0.0,
            "avg_logprob": -0.25,
            "compression_ratio": 0.9,
            "no_speech_prob": 0.01,
        },
        {
            "id": 1,
            "seek": 125,
            "start": 1.25,
            "end": 3.5,
            "text": " General Kenobi.",
            "tokens": [3611],
            "temperature": 0.2,
            "avg_logprob": -0.5,
            "compression_ratio": 1.1,
            "no_speech_prob": 0.02,
        },
    ]


def test_verbose_json_languages() -> None:
    german = {**RESULT, "language": "de"}
    assert bodies.verbose_body(work("verbose_json", task="translate"), german)["language"] == (
        "german"
    )
    odd = {**RESULT, "language": "xx"}
    assert bodies.verbose_body(work("verbose_json"), odd)["language"] == "xx"


def test_verbose_json_segment_defaults() -> None:
    bare = {"language": "en", "duration": 1.0, "segments": [{"start": 0, "end": 1, "text": " a"}]}
    [segment] = bodies.verbose_body(work("verbose_json"), bare)["segments"]
    assert segment == {
        "id": 0,
        "seek": 0,
        "start": 0.0,
        "end": 1.0,
        "text": " a",
        "tokens": [],
        "temperature": 0.0,
        "avg_logprob": 0.0,
        "compression_ratio": 0.0,
        "no_speech_prob": 0.0,
    }


def test_verbose_json_words() -> None:
    body = bodies.verbose_body(work("verbose_json", words=True, segments=False), RESULT)
    assert "segments" not in body
    assert body["words"] == [
        {"word": "Hello", "start": 0.0, "end": 0.5},
        {"word": "there.", "start": 0.5, "end": 1.25},
        {"word": "General", "start": 1.25, "end": 2.0},
        {"word": "Kenobi.", "start": 2.0, "end": 3.5},
    ]
    both = bodies.verbose_body(work("verbose_json", words=True, segments=True), RESULT)
    assert len(both["segments"]) == 2
    assert len(both["words"]) == 4


def test_verbose_json_segments_by_default() -> None:
    bare_work = {"task": "transcribe", "response_format": "verbose_json"}
    body = bodies.verbose_body(bare_work, RESULT)
    assert len(body["segments"]) == 2
    assert "words" not in body


def test_words_asked_but_none_given() -> None:
    plain = [{k: v for k, v in s.items() if k != "words"} for s in SEGMENTS]
    body = bodies.verbose_body(work("verbose_json", words=True), {**RESULT, "segments": plain})
    assert body["words"] == []


@pytest.mark.parametrize(
    ("fmt", "media"),
    [
        ("json", "application/json"),
        ("verbose_json", "application/json"),
        ("text", "text/plain; charset=utf-8"),
        ("srt", "application/x-subrip; charset=utf-8"),
        ("vtt", "text/vtt; charset=utf-8"),
    ],
)
def test_render_media_types(fmt: str, media: str) -> None:
    body, media_type = bodies.render(work(fmt), RESULT)
    assert media_type == media
    if fmt == "json":
        assert orjson.loads(body) == bodies.json_body(RESULT)
    elif fmt == "verbose_json":
        assert orjson.loads(body) == bodies.verbose_body(work(fmt), RESULT)
    elif fmt == "srt":
        assert body == bodies.srt(SEGMENTS).encode()
    elif fmt == "vtt":
        assert body == bodies.vtt(SEGMENTS).encode()


def test_render_defaults_to_json() -> None:
    body, media = bodies.render({"task": "transcribe"}, RESULT)
    assert media == "application/json"
    assert orjson.loads(body) == bodies.json_body(RESULT)


def test_render_non_ascii() -> None:
    result = {
        "language": "de",
        "duration": 1.0,
        "segments": [{"start": 0, "end": 1, "text": " Grüße"}],
    }
    assert bodies.render(work("text"), result)[0] == "Grüße\n".encode()
    assert orjson.loads(bodies.render(work("json"), result)[0])["text"] == "Grüße"


def test_stream_events() -> None:
    delta = bodies.delta_event(" Hello")
    assert delta.startswith(b"data: ")
    assert delta.endswith(b"\n\n")
    assert orjson.loads(delta[len(b"data: ") : -2]) == {
        "type": "transcript.text.delta",
        "delta": " Hello",
    }
    done = bodies.done_event("Hello there.", 2.2)
    assert done.startswith(b"data: ")
    assert done.endswith(b"\n\n")
    assert done.count(b"\n") == 2
    assert orjson.loads(done[len(b"data: ") : -2]) == {
        "type": "transcript.text.done",
        "text": "Hello there.",
        "usage": {"type": "duration", "seconds": 3},
    }


def test_stream_event_with_newlines_stays_one_event() -> None:
    event = bodies.delta_event("line one\nline two")
    assert event.count(b"\n") == 2  # the JSON escapes the text's newline


def test_outcome_body() -> None:
    assert bodies.outcome_body(work("json"), RESULT) == bodies.json_body(RESULT)
    assert bodies.outcome_body({"task": "transcribe"}, RESULT) == bodies.json_body(RESULT)
    verbose = work("verbose_json", words=True)
    assert bodies.outcome_body(verbose, RESULT) == bodies.verbose_body(verbose, RESULT)
