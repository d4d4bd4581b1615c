"""Whisper checkpoints in Hugging Face layout through transformers: the speech capability's
second backend (``WhisperForConditionalGeneration`` + ``WhisperProcessor``).

Everything goes through the model's own ``generate`` with ``return_timestamps=True`` and
``return_segments=True``: transformers' port of OpenAI's seek loop, which decodes 30 s
windows with Whisper's timestamp rules, cuts each window's output into segments at
consecutive timestamp tokens and seeks to the last one, so audio of any length works (long
audio as one feature array, ``padding="longest"``). Its segments carry their times in
seconds from the start of the audio. The ``automatic-speech-recognition`` pipeline is not
used: it chunks long audio with strides and merges the chunks' texts, and it hides the
per-segment tokens.

- Each window is the clip's own log-mel frames, zero-padded to 3000 frames (as OpenAI
  pads its mel), and the seek loop ends at the clip's last frame, so no padding is
  decoded. Short clips (``transcribe_many``) go through one ``generate`` call as a
  batch, through its batched long-form path (a frame mask per clip): per clip the same
  windows and decoder prompt as alone, so greedy results equal ``transcribe``'s.
  Segment times past the end of the audio (a timestamp in the padding) are clipped.
- The language is the request's, or detected once from the first 30 s
  (``detect_language``) and passed on, so it is known; English-only checkpoints get
  neither language nor task (``generate`` refuses them) and report ``en``.
- Word times (``return_token_timestamps=True``) are transformers' DTW over the
  cross-attention of the generation config's ``alignment_heads``, grouped into words as
  OpenAI does (a word starts at a space; punctuation joins its neighbour). They need eager
  attention, which ``generate`` switches on; it is switched back after the call. In a
  batch the DTW also sees the steps a shorter sequence spent padding, so clips that ask
  for words are decoded one by one.

Catalog defaults read here: ``max_new_tokens`` (cap per window), ``beam_size`` (default 1,
greedy; used at temperature 0 only), ``batch_size``.
"""

from __future__ import annotations

import logging
import string
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import WhisperForConditionalGeneration, WhisperProcessor

from tasks.contracts.audio import AudioOptions
from workers.backends.audio import (
    SAMPLE_RATE,
    Segment,
    SpeechBackend,
    SpeechOptions,
    Transcript,
    Word,
)
from workers.backends.torch_dtype import torch_dtype

log = logging.getLogger(__name__)

WINDOW_SAMPLES = 30 * SAMPLE_RATE  # one Whisper window
WINDOW_FRAMES = 3000  # its log-mel frames
# OpenAI's word grouping (whisper/timing.py)
PREPENDED = "\"'“¿([{-"
APPENDED = "\"'.\u3002,\uff0c!\uff01?\uff1f:\uff1a\u201d)]}\u3001"  # full-width forms escaped
NO_SPACE_LANGUAGES = frozenset({"zh", "ja", "th", "lo", "my", "yue"})

RawSegment = dict[str, Any]  # one segment as ``generate(return_segments=True)`` gives it


class TransformersSpeechBackend(SpeechBackend):
    model: Any
    processor: Any

    def load(self) -> None:
        dtype = torch_dtype(self.entry.dtype, self.device)
        self.processor = WhisperProcessor.from_pretrained(self.model_path)
        self.model = WhisperForConditionalGeneration.from_pretrained(self.model_path, dtype=dtype)
        self.model.to(self.device).eval()
        config = self.model.generation_config
        self.eot = int(config.eos_token_id)
        self.timestamp_begin = int(config.no_timestamps_token_id) + 1
        lang_to_id = getattr(config, "lang_to_id", None) or {}
        self.languages = {int(i): str(tok).strip("<|>") for tok, i in lang_to_id.items()}
        log.info("%s loaded on %s (%s)", self.entry.id, self.device, dtype)

    @property
    def english_only(self) -> bool:
        config = self.model.generation_config
        return not (getattr(config, "is_multilingual", True) and self.languages)

    # -- requests -----------------------------------------------------------------------

    def transcribe(self, audio: np.ndarray, options: SpeechOptions) -> Transcript:
        language, segments = self._run([audio], options)[0]
        return Transcript(language, iter(segments))

    def transcribe_many(
        self, clips: Sequence[np.ndarray], options: SpeechOptions
    ) -> list[tuple[str, list[Segment]]]:
        if options.words or any(len(clip) > WINDOW_SAMPLES for clip in clips):
            # words: the batch's DTW is not the clip's own; long clips: long-form batches
            # seek per clip (see the module docstring)
            return super().transcribe_many(clips, options)
        out: list[tuple[str, list[Segment]]] = []
        step = max(1, self.batch_size)
        for first in range(0, len(clips), step):
            out += self._run(clips[first : first + step], options)
        return out

    # -- decoding -----------------------------------------------------------------------

    def _run(
        self, clips: Sequence[np.ndarray], options: SpeechOptions
    ) -> list[tuple[str, list[Segment]]]:
        """Clips (all short, or one of any length) through one ``generate`` call."""
        features, mask = self._features(clips)
        languages = self._languages(features, options)
        kwargs = self._generate_kwargs(options, languages)
        kwargs["attention_mask"] = mask
        with self._restore_attention(), torch.inference_mode():
            out = self.model.generate(features, **kwargs)
        return [
            (language, self._segments(raw, len(clip) / SAMPLE_RATE, language, options))
            for language, raw, clip in zip(languages, out["segments"], clips, strict=True)
        ]

    def _features(self, clips: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-mel features and their frame mask, cut so that ``generate`` stops at the end
        of each clip's audio: one clip: its own frames (each window zero-padded to 3000
        frames by ``generate``, as OpenAI pads its mel); several: zeros behind each clip and
        one frame more than a window, which takes ``generate``'s batched long-form path,
        where the mask ends each clip's seek loop."""
        audio = [np.asarray(clip, dtype=np.float32) for clip in clips]
        long = any(len(a) > WINDOW_SAMPLES for a in audio)
        extra: dict[str, Any] = {"padding": "longest", "truncation": False} if long else {}
        out = self.processor.feature_extractor(
            audio,
            sampling_rate=SAMPLE_RATE,
            return_tensors="pt",
            return_attention_mask=True,
            **extra,
        )
        features = out["input_features"]
        frames = out["attention_mask"].sum(dim=-1).clamp(min=1)
        if len(audio) == 1:
            features = features[..., : int(frames[0])]
            mask = torch.ones((1, features.shape[-1]), dtype=torch.long)
        else:
            width = features.shape[-1] + 1
            mask = (torch.arange(width)[None, :] < frames[:, None]).long()
            features = F.pad(features, (0, 1)) * mask[:, None, :]
        return features.to(self.device, self.model.dtype), mask.to(self.device)

    def _languages(self, features: torch.Tensor, options: SpeechOptions) -> list[str]:
        """Per clip: ``en`` (English-only), the request's, or detected from 30 s."""
        if self.english_only:
            return ["en"] * features.shape[0]
        if options.language:
            return [options.language] * features.shape[0]
        window = features[..., :WINDOW_FRAMES]
        window = F.pad(window, (0, WINDOW_FRAMES - window.shape[-1]))
        with torch.inference_mode():
            ids = self.model.detect_language(input_features=window)
        return [self.languages[int(i)] for i in ids]

    def _generate_kwargs(self, options: SpeechOptions, languages: list[str]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "return_timestamps": True,
            "return_segments": True,
            "temperature": float(options.temperature),
        }
        if not self.english_only:
            kwargs["language"] = languages
            kwargs["task"] = options.task
        if options.prompt:
            prompt = self.processor.get_prompt_ids(options.prompt, return_tensors="pt")
            kwargs["prompt_ids"] = prompt.to(self.device)
        if options.words:
            kwargs["return_token_timestamps"] = True
        catalog = AudioOptions.of(self.entry)
        if catalog.max_new_tokens:
            kwargs["max_new_tokens"] = catalog.max_new_tokens
        beams = catalog.beam_size or 1
        if beams > 1 and options.temperature == 0:
            kwargs["num_beams"] = beams
        return kwargs

    @contextmanager
    def _restore_attention(self) -> Iterator[None]:
        """``generate`` with token timestamps switches the model to eager attention for
        good; switch it back afterwards."""
        config = self.model.config
        before = config._attn_implementation
        try:
            yield
        finally:
            if config._attn_implementation != before:
                config._attn_implementation = before

    # -- results ------------------------------------------------------------------------

    def _text(self, tokens: Sequence[int]) -> str:
        """Text tokens as text, Whisper's leading space kept (no clean-up)."""
        ids = [t for t in tokens if t < self.eot]
        return str(self.processor.tokenizer.backend_tokenizer.decode(ids))

    def _segments(
        self, raw: list[RawSegment], duration: float, language: str, options: SpeechOptions
    ) -> list[Segment]:
        out: list[Segment] = []
        for seg in raw:
            start = float(seg["start"])
            tokens = [int(t) for t in seg["tokens"]]
            text = self._text(tokens)
            if start >= duration or not text.strip():
                continue
            end = min(max(float(seg["end"]), start), duration)
            words: tuple[Word, ...] = ()
            if options.words and "token_timestamps" in seg:
                stamps = [float(s) for s in seg["token_timestamps"]]
                spaces = language not in NO_SPACE_LANGUAGES
                words = self._words(tokens, stamps, (start, end), spaces=spaces)
            out.append(Segment(start, end, text, tuple(tokens), options.temperature, words=words))
        return out

    def _words(
        self,
        tokens: list[int],
        stamps: list[float],
        bounds: tuple[float, float],
        *,
        spaces: bool,
    ) -> tuple[Word, ...]:
        """The segment's words: a word from its first token's time to the time of the
        token after its last, clipped to the segment."""
        groups = _merge_punctuation(self._split(tokens, spaces=spaces))
        lo, hi = bounds
        words: list[Word] = []
        for text, positions in groups:
            if not text:
                continue
            after = min(positions[-1] + 1, len(stamps) - 1)
            start = min(max(stamps[positions[0]], lo), hi)
            end = min(max(stamps[after], start), hi)
            words.append(Word(text, start, end))
        return tuple(words)

    def _split(self, tokens: list[int], *, spaces: bool) -> list[tuple[str, list[int]]]:
        """Text tokens (by position in ``tokens``) grouped into whole characters, then
        into words at spaces and punctuation (OpenAI's ``split_to_word_tokens``)."""
        pieces: list[tuple[str, list[int]]] = []
        current: list[int] = []
        for pos, token in enumerate(tokens):
            if token >= self.eot:
                continue
            current.append(pos)
            text = self._text([tokens[p] for p in current])
            if "\ufffd" not in text:
                pieces.append((text, current))
                current = []
        if current:
            pieces.append((self._text([tokens[p] for p in current]), current))
        if not spaces:
            return pieces
        words: list[tuple[str, list[int]]] = []
        for text, positions in pieces:
            if not words or text.startswith(" ") or text.strip() in string.punctuation:
                words.append((text, positions))
            else:
                words[-1] = (words[-1][0] + text, words[-1][1] + positions)
        return words


def _merge_punctuation(words: list[tuple[str, list[int]]]) -> list[tuple[str, list[int]]]:
    """OpenAI's ``merge_punctuations``: opening marks join the next word, closing marks
    the previous one (the emptied entry stays, with no text)."""
    merged = list(words)
    following = len(merged) - 1
    for i in range(len(merged) - 2, -1, -1):
        text, positions = merged[i]
        if text.startswith(" ") and text.strip() in PREPENDED:
            merged[following] = (text + merged[following][0], positions + merged[following][1])
            merged[i] = ("", [])
        else:
            following = i
    previous = 0
    for j in range(1, len(merged)):
        text, positions = merged[j]
        if text and text in APPENDED and not merged[previous][0].endswith(" "):
            merged[previous] = (merged[previous][0] + text, merged[previous][1] + positions)
            merged[j] = ("", [])
        else:
            previous = j
    return merged
