"""The transformers Whisper backend on a tiny random-weight checkpoint
(``tests/audio_models.py``) and the real speech clips in ``tests/assets/audio``.

Random weights give arbitrary text, so results are checked against ``model.generate``
called directly on the same features (the decode path), against each other (batched
against one by one) and against invariants of times, not against a transcript.
"""

from __future__ import annotations

import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from configs.catalog import CatalogEntry
from tests.audio_models import build_whisper
from workers.backends.audio import SAMPLE_RATE, Segment, SpeechOptions
from workers.backends.audio_transformers import TransformersSpeechBackend

AUDIO = Path(__file__).resolve().parents[1] / "assets" / "audio"
MAX_NEW_TOKENS = 12
TOLERANCE_S = 0.02  # one timestamp step


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getframerate(), w.getsampwidth()) == (1, SAMPLE_RATE, 2)
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    return pcm.astype(np.float32) / 32768.0


def load_backend(path: Path) -> TransformersSpeechBackend:
    entry = CatalogEntry(
        id="test/tiny-whisper",
        capability="audio",
        backend="workers.backends.audio_transformers:TransformersSpeechBackend",
        source={"path": str(path)},
        max_input_tokens=448,
        batch_token_budget=0,
        options={"max_new_tokens": MAX_NEW_TOKENS, "batch_size": 8},
    )
    backend = TransformersSpeechBackend(entry, device="cpu", model_path=str(path))
    backend.load()
    return backend


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The tiny model gains nothing from threads, and spinning threads cost seconds on a
    busy two-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def clips() -> list[np.ndarray]:
    return [read_wav(p) for p in sorted(AUDIO.glob("clip*.wav"))]


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TransformersSpeechBackend]:
    torch.manual_seed(0)
    yield load_backend(build_whisper(tmp_path_factory.mktemp("whisper")))


@pytest.fixture(scope="module")
def multilingual(tmp_path_factory: pytest.TempPathFactory) -> TransformersSpeechBackend:
    return load_backend(build_whisper(tmp_path_factory.mktemp("whisper"), multilingual=True))


def direct_generate(backend: TransformersSpeechBackend, audio: np.ndarray) -> list[Segment]:
    """What ``model.generate`` gives on the clip's own feature frames, kept as the
    backend keeps segments (text, and starting inside the audio)."""
    processor, model = backend.processor, backend.model
    out = processor.feature_extractor(
        audio, sampling_rate=SAMPLE_RATE, return_tensors="pt", return_attention_mask=True
    )
    frames = int(out["attention_mask"].sum())
    with torch.inference_mode():
        result = model.generate(
            out["input_features"][..., :frames],
            return_timestamps=True,
            return_segments=True,
            max_new_tokens=MAX_NEW_TOKENS,
        )
    duration = len(audio) / SAMPLE_RATE
    kept: list[Segment] = []
    for seg in result["segments"][0]:
        tokens = tuple(int(t) for t in seg["tokens"])
        text_ids = [t for t in tokens if t < model.generation_config.eos_token_id]
        text = processor.tokenizer.decode(text_ids, clean_up_tokenization_spaces=False)
        if float(seg["start"]) < duration and text.strip():
            kept.append(Segment(float(seg["start"]), float(seg["end"]), text, tokens))
    return kept


def check_times(segments: list[Segment], duration: float) -> None:
    previous = 0.0
    for seg in segments:
        assert 0.0 <= seg.start <= seg.end <= duration + TOLERANCE_S
        assert seg.start >= previous - TOLERANCE_S
        previous = seg.end


def test_english_only_checkpoint(backend: TransformersSpeechBackend) -> None:
    assert backend.english_only
    assert backend.model.dtype == torch.float32
    assert not backend.model.training


def test_transcribe_matches_generate(
    backend: TransformersSpeechBackend, clips: list[np.ndarray]
) -> None:
    transcript = backend.transcribe(clips[1], SpeechOptions())
    segments = list(transcript.segments)
    expected = direct_generate(backend, clips[1])
    assert transcript.language == "en"
    assert segments
    assert [s.tokens for s in segments] == [e.tokens for e in expected]
    assert [s.text for s in segments] == [e.text for e in expected]
    # faster-whisper's convention: Whisper's leading space kept, no clean-up
    ids = backend.processor.tokenizer.encode(" Hello world .", add_special_tokens=False)
    assert backend._text([*ids, backend.eot]) == " Hello world ."
    for seg, exp in zip(segments, expected, strict=True):
        assert seg.start == pytest.approx(exp.start)
        assert seg.end == pytest.approx(min(exp.end, len(clips[1]) / SAMPLE_RATE))
        assert seg.temperature == 0.0


def test_transcribe_many_equals_one_by_one(
    backend: TransformersSpeechBackend, clips: list[np.ndarray]
) -> None:
    # three lengths: 3.4 s, 4.7 s and 7.7 s (two clips joined)
    batch = [clips[0], clips[1], np.concatenate(clips[2:4])]
    many = backend.transcribe_many(batch, SpeechOptions())
    assert len(many) == 3
    for clip, (language, segments) in zip(batch, many, strict=True):
        one = backend.transcribe(clip, SpeechOptions())
        assert language == one.language == "en"
        assert segments == list(one.segments)
        check_times(segments, len(clip) / SAMPLE_RATE)


def test_words_lie_in_their_segment(
    backend: TransformersSpeechBackend, clips: list[np.ndarray]
) -> None:
    clip = clips[2]
    segments = list(backend.transcribe(clip, SpeechOptions(words=True)).segments)
    plain = list(backend.transcribe(clip, SpeechOptions()).segments)
    assert [s.tokens for s in segments] == [s.tokens for s in plain]
    check_times(segments, len(clip) / SAMPLE_RATE)
    for seg in segments:
        assert seg.words
        # punctuation merges within the segment only: its words spell its text
        assert "".join(w.word for w in seg.words) == seg.text
        previous = seg.start
        for word in seg.words:
            # DTW over random cross-attention can put a token anywhere in the window, so
            # the backend clips word times to the segment: what holds is containment and
            # order, not closeness to the segment's timestamps
            assert seg.start <= word.start <= word.end <= seg.end
            assert word.start >= previous
            previous = word.start
    # word timestamps ask for eager attention; the model is switched back afterwards
    assert backend.model.config._attn_implementation != "eager"


def test_long_audio(backend: TransformersSpeechBackend, clips: list[np.ndarray]) -> None:
    audio = np.concatenate([*clips, *clips[:2]])
    duration = len(audio) / SAMPLE_RATE
    assert duration > 40
    segments = list(backend.transcribe(audio, SpeechOptions()).segments)
    assert segments
    check_times(segments, duration)
    # generate went past the first 30 s window (its seek loop, not one truncated window)
    assert segments[-1].end > 30.0


def test_multilingual_language_task_prompt(
    multilingual: TransformersSpeechBackend, clips: list[np.ndarray]
) -> None:
    assert not multilingual.english_only
    detected = multilingual.transcribe(clips[0], SpeechOptions())
    assert detected.language in multilingual.languages.values()
    list(detected.segments)
    given = multilingual.transcribe(clips[0], SpeechOptions(language="fr", task="translate"))
    assert given.language == "fr"
    check_times(list(given.segments), len(clips[0]) / SAMPLE_RATE)
    prompted = multilingual.transcribe(clips[0], SpeechOptions(language="en", prompt="Stella"))
    check_times(list(prompted.segments), len(clips[0]) / SAMPLE_RATE)
    # detection per clip in a batch, as alone
    batch = multilingual.transcribe_many([clips[0], clips[1]], SpeechOptions())
    assert batch[0][0] == detected.language
    assert batch[1][0] == multilingual.transcribe(clips[1], SpeechOptions()).language


def test_sampling(backend: TransformersSpeechBackend, clips: list[np.ndarray]) -> None:
    torch.manual_seed(1)
    segments = list(backend.transcribe(clips[0], SpeechOptions(temperature=0.8)).segments)
    check_times(segments, len(clips[0]) / SAMPLE_RATE)
    assert all(s.temperature == 0.8 for s in segments)
