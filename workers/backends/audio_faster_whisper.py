"""Whisper on CTranslate2 through faster-whisper: the speech capability's default backend.

int8 on CPU, float16 on CUDA (a catalog entry's ``compute_type`` default overrides).
One clip or window goes through ``WhisperModel.transcribe``, whose segments are computed
as its generator is advanced (30 s of audio per decode, temperature fallback, the text
so far as the next window's prompt). Short clips of several requests go through
faster-whisper's batched pipeline in one encoder and one decoder call: each clip is a
"chunk" of one concatenated array, marked by ``clip_timestamps``, and the segments come
back tagged with their chunk's offset.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from faster_whisper import BatchedInferencePipeline, WhisperModel
from faster_whisper.transcribe import Segment as FwSegment

from tasks.contracts.audio import AudioOptions
from workers.backends.audio import (
    SAMPLE_RATE,
    Segment,
    SpeechBackend,
    SpeechOptions,
    Transcript,
    Word,
)

log = logging.getLogger(__name__)

# OpenAI's temperature 0: "the model uses log probability to automatically increase the
# temperature until certain thresholds are hit" (Whisper's own fallback ladder)
FALLBACK = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
GAP_S = 1.0  # silence between two clips of a batch (no chunk touches another)


class FasterWhisperBackend(SpeechBackend):
    model: WhisperModel
    pipeline: BatchedInferencePipeline

    def load(self) -> None:
        cuda = self.device.startswith("cuda")
        compute = AudioOptions.of(self.entry).compute_type or ("float16" if cuda else "int8")
        device, _, index = self.device.partition(":")
        self.model = WhisperModel(
            self.model_path,
            device=device,
            device_index=int(index or 0),
            compute_type=compute,
            cpu_threads=0 if cuda else (os.cpu_count() or 1),
            local_files_only=os.path.isdir(self.model_path),  # a hub id downloads
        )
        self.pipeline = BatchedInferencePipeline(self.model)
        log.info("%s loaded on %s (%s)", self.entry.id, self.device, compute)

    @property
    def english_only(self) -> bool:
        return not self.model.model.is_multilingual

    @property
    def beam_size(self) -> int:
        return AudioOptions.of(self.entry).beam_size or 5

    def _kwargs(self, options: SpeechOptions) -> dict[str, Any]:
        return {
            "language": "en" if self.english_only else options.language,
            "task": "transcribe" if self.english_only else options.task,
            "beam_size": self.beam_size,
            "temperature": FALLBACK if options.temperature == 0 else options.temperature,
            "initial_prompt": options.prompt or None,
            "word_timestamps": options.words,
        }

    def transcribe(self, audio: np.ndarray, options: SpeechOptions) -> Transcript:
        segments, info = self.model.transcribe(audio, **self._kwargs(options))
        return Transcript(info.language, (_segment(s) for s in segments))

    def transcribe_many(
        self, clips: Sequence[np.ndarray], options: SpeechOptions
    ) -> list[tuple[str, list[Segment]]]:
        if len(clips) == 0:
            return []
        if options.language is None and not self.english_only:
            # the batched pipeline detects one language for all its chunks
            return super().transcribe_many(clips, options)
        gap = np.zeros(int(GAP_S * SAMPLE_RATE), dtype=np.float32)
        offsets: list[float] = []
        pieces: list[np.ndarray] = []
        stamps: list[dict[str, float]] = []
        at = 0
        for clip in clips:
            offsets.append(at / SAMPLE_RATE)
            stamps.append({"start": at / SAMPLE_RATE, "end": (at + len(clip)) / SAMPLE_RATE})
            pieces += [clip.astype(np.float32, copy=False), gap]
            at += len(clip) + len(gap)
        kwargs = self._kwargs(options)
        # one decode per chunk, no fallback: the batched pipeline's first temperature
        kwargs["temperature"] = options.temperature
        segments, info = self.pipeline.transcribe(
            np.concatenate(pieces),
            clip_timestamps=stamps,
            batch_size=len(clips),
            without_timestamps=False,
            vad_filter=False,
            **kwargs,
        )
        return _by_clip(list(segments), offsets, info.language)


def _by_clip(
    segments: list[FwSegment], offsets: list[float], language: str
) -> list[tuple[str, list[Segment]]]:
    """The batched pipeline's segments back to their clips (``seek`` is the frame of the
    chunk's offset), times from each clip's start."""
    frames = {round(off * 100): n for n, off in enumerate(offsets)}  # 100 frames per second
    out: list[tuple[str, list[Segment]]] = [(language, []) for _ in offsets]
    for seg in segments:
        n = frames.get(seg.seek)
        if n is None:  # rounding: the nearest offset
            n = int(np.argmin([abs(seg.seek / 100 - off) for off in offsets]))
        out[n][1].append(_segment(seg).shifted(-offsets[n]))
    return out


def _segment(seg: FwSegment) -> Segment:
    return Segment(
        start=float(seg.start),
        end=float(seg.end),
        text=seg.text,
        tokens=tuple(seg.tokens),
        temperature=float(seg.temperature or 0.0),
        avg_logprob=float(seg.avg_logprob),
        compression_ratio=float(seg.compression_ratio),
        no_speech_prob=float(seg.no_speech_prob),
        words=tuple(Word(w.word, float(w.start), float(w.end)) for w in seg.words or ()),
    )
