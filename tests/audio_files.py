"""Speech test assets: the committed espeak-ng clips (``tests/assets/audio``, 16 kHz mono,
with what each says in ``transcripts.tsv``), other containers made from them with PyAV at
test time, long files made by joining clips, and the word error rate."""

from __future__ import annotations

import re
import wave
from pathlib import Path

import av
import numpy as np
import numpy.typing as npt
import pytest
from av.audio.stream import AudioStream

SAMPLE_RATE = 16000
CLIPS = Path(__file__).resolve().parent / "assets" / "audio"
Floats = npt.NDArray[np.float32]

# name -> (container format, encoder, encoder rate, layout, encoder options)
FORMATS: dict[str, tuple[str, str, int, str, dict[str, str]]] = {
    "mp3": ("mp3", "libmp3lame", 16000, "mono", {}),
    "m4a": ("ipod", "aac", 16000, "mono", {}),
    "flac": ("flac", "flac", 16000, "mono", {}),
    "ogg": ("ogg", "libopus", 48000, "mono", {}),
    "webm": ("webm", "libopus", 48000, "mono", {}),
    # FFmpeg's own vorbis encoder is experimental and stereo only
    "vorbis.ogg": ("ogg", "vorbis", 44100, "stereo", {"strict": "experimental"}),
}


def transcripts() -> dict[str, str]:
    """Clip name (``clip01``) -> the sentence espeak-ng said."""
    rows = (line.split("\t", 1) for line in (CLIPS / "transcripts.tsv").read_text().splitlines())
    return {name: text for name, text in rows}


def clip_path(name: str) -> Path:
    return CLIPS / f"{name}.wav"


def read_wav(path: Path) -> Floats:
    with wave.open(str(path), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, SAMPLE_RATE)
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    return (data.astype(np.float32) / 32768.0).astype(np.float32)


def write_wav(path: Path, samples: np.ndarray, rate: int = SAMPLE_RATE, channels: int = 1) -> Path:
    """``samples``: float in [-1, 1], shape (n,) or (n, channels)."""
    pcm = np.clip(np.round(samples * 32767.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def encode(source: Floats, path: Path, spec: tuple[str, str, int, str, dict[str, str]]) -> Path:
    """``source`` (16 kHz mono) written in another container and codec."""
    fmt, codec, rate, layout, options = spec
    if codec not in av.codecs_available:
        pytest.skip(f"this PyAV build has no {codec} encoder")
    pcm = np.round(source * 32767.0).astype(np.int16)[None, :]
    frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
    frame.sample_rate = SAMPLE_RATE
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout, options=options)
        assert isinstance(stream, AudioStream)
        if codec != "flac":
            stream.bit_rate = 64000  # lame's default for 16 kHz mono (24 kb/s) garbles speech
        out.mux(stream.encode(frame))  # PyAV converts to the encoder's format, layout, rate
        out.mux(stream.encode(None))
    return path


def joined(names: list[str], gap_s: float = 1.0) -> Floats:
    """Clips one after another with ``gap_s`` of silence after each."""
    gap = np.zeros(int(gap_s * SAMPLE_RATE), dtype=np.float32)
    parts: list[Floats] = []
    for name in names:
        parts += [read_wav(clip_path(name)), gap]
    return np.concatenate(parts)


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(word edits, reference words): the Levenshtein distance over words."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[len(hyp)], len(ref)


def wer(reference: str, hypothesis: str) -> float:
    errors, total = word_errors(reference, hypothesis)
    return errors / max(1, total)
