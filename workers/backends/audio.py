"""Speech recognition backends: what the speech engine (``workers/audio_engine.py``)
drives, and the shapes they answer in.

Audio reaches a backend already decoded: mono float32 samples at ``SAMPLE_RATE``
(``workers/audio.py``), one window of a long file at a time. A backend gives the engine

- ``transcribe``: one clip or window, its segments produced lazily (the engine advances
  the iterator one segment per scheduling step, so a long batch job yields to live work
  between segments, and a stream sends each segment as it is done);
- ``transcribe_many``: several short clips (each at most ``max_clip_s``) with the same
  options, in as few forwards as the backend allows.

Times in segments and words are seconds from the start of the audio handed in; the
engine adds the window's offset.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tasks.contracts.audio import AudioOptions
from workers.backends.base import ModelBackend

SAMPLE_RATE = 16000


@dataclass(frozen=True)
class SpeechOptions:
    """What one request asks of the model (the engine batches only equal options)."""

    task: str = "transcribe"  # or "translate" (into English)
    language: str | None = None  # ISO-639-1; None: detect
    prompt: str | None = None
    temperature: float = 0.0
    words: bool = False  # word timestamps

    def group(self) -> tuple[Any, ...]:
        return (self.task, self.language, self.prompt, self.temperature, self.words)


@dataclass(frozen=True)
class Word:
    word: str
    start: float
    end: float


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    text: str
    tokens: tuple[int, ...] = ()
    temperature: float = 0.0
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float = 0.0
    words: tuple[Word, ...] = ()

    def shifted(self, offset: float) -> Segment:
        """This segment with ``offset`` seconds added to every time."""
        if not offset:
            return self

        def at(t: float) -> float:
            return max(0.0, round(t + offset, 3))

        return Segment(
            start=at(self.start),
            end=at(self.end),
            text=self.text,
            tokens=self.tokens,
            temperature=self.temperature,
            avg_logprob=self.avg_logprob,
            compression_ratio=self.compression_ratio,
            no_speech_prob=self.no_speech_prob,
            words=tuple(Word(w.word, at(w.start), at(w.end)) for w in self.words),
        )


@dataclass
class Transcript:
    """What ``transcribe`` answers: the language (detected or given) and the segments,
    computed as the iterator is advanced."""

    language: str
    segments: Iterator[Segment]
    extra: dict[str, Any] = field(default_factory=dict)


class SpeechBackend(ModelBackend):
    capabilities = ("audio",)
    # clips at most this long go through ``transcribe_many`` (Whisper's window)
    max_clip_s: float = 30.0

    @property
    def batch_size(self) -> int:
        """Short clips in one ``transcribe_many`` call at most (1: no batching)."""
        return AudioOptions.of(self.entry).batch_size

    @property
    def english_only(self) -> bool:
        """An English-only model (``language`` other than ``en`` is refused, translation
        is a transcription)."""
        return False

    @abstractmethod
    def transcribe(self, audio: np.ndarray, options: SpeechOptions) -> Transcript:
        """One clip or window (any length), its segments lazily."""

    def transcribe_many(
        self, clips: Sequence[np.ndarray], options: SpeechOptions
    ) -> list[tuple[str, list[Segment]]]:
        """Short clips with the same options: (language, segments) per clip. This default
        goes one by one; a backend that can batch overrides it."""
        out: list[tuple[str, list[Segment]]] = []
        for clip in clips:
            transcript = self.transcribe(clip, options)
            out.append((transcript.language, list(transcript.segments)))
        return out

    def warmup(self) -> None:
        one_second = np.zeros(SAMPLE_RATE, dtype=np.float32)
        list(self.transcribe(one_second, SpeechOptions()).segments)
        self.warm = True
