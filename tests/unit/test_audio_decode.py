"""tasks/media/audio_decode.py: formats, resampling, streaming windows, refusals.

The other formats are made at test time by re-encoding ``clip01.wav`` with PyAV's own
encoders (libmp3lame, aac, flac, libopus, the experimental native vorbis), so no fixture
file but the espeak-ng clips is checked in and no system ffmpeg is needed.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pytest

from tasks.errors import InvalidRequest
from tasks.media.audio_decode import (
    DURATION_SLACK_S,
    SAMPLE_RATE,
    AudioInfo,
    Window,
    _Mono16k,
    decode,
    probe,
    windows,
)
from tests.audio_files import CLIPS, FORMATS, Floats, encode, read_wav, write_wav

CLIP = CLIPS / "clip01.wav"
ACCEPTED = "(wav, mp3, m4a/mp4/mov, flac, ogg, webm/mkv)"  # what the refusals list


def envelope(samples: np.ndarray, hop: int = 400) -> np.ndarray:
    n = samples.size // hop
    return np.sqrt(np.mean(samples[: n * hop].reshape(n, hop) ** 2, axis=1))


def best_correlation(a: np.ndarray, b: np.ndarray, max_lag: int = 8) -> float:
    """The highest correlation of two energy envelopes over small shifts (codec delay)."""
    best = -1.0
    for lag in range(-max_lag, max_lag + 1):
        x, y = (a[lag:], b) if lag >= 0 else (a, b[-lag:])
        n = min(x.size, y.size)
        best = max(best, float(np.corrcoef(x[:n], y[:n])[0, 1]))
    return best


def refusal(exc: pytest.ExceptionInfo[InvalidRequest]) -> str:
    assert exc.value.param == "file"
    return exc.value.message


@pytest.fixture(scope="module")
def clip() -> Floats:
    return read_wav(CLIP)


@pytest.fixture(scope="module")
def long_wav(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Floats]:
    """~70 s: fourteen clips, each followed by 1.5 s of faint noise (a quiet room)."""
    rng = np.random.default_rng(0)
    parts: list[np.ndarray] = []
    for index in [*range(1, 11), *range(1, 5)]:
        parts.append(read_wav(CLIPS / f"clip{index:02d}.wav"))
        parts.append(rng.normal(0.0, 0.001, int(1.5 * SAMPLE_RATE)).astype(np.float32))
    path = tmp_path_factory.mktemp("long") / "long.wav"
    write_wav(path, np.concatenate(parts))
    return path, read_wav(path)


# -- formats --------------------------------------------------------------------------------


def test_wav_decodes_to_its_samples(clip: Floats) -> None:
    samples = decode(CLIP, max_duration_s=60)
    assert samples.dtype == np.float32 and samples.ndim == 1
    np.testing.assert_allclose(samples, clip, atol=1e-6)
    info = probe(CLIP, max_duration_s=60)
    assert info == AudioInfo(duration=clip.size / SAMPLE_RATE, format="wav", codec="pcm_s16le")


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_format_decodes_like_the_wav(name: str, clip: Floats, tmp_path: Path) -> None:
    path = tmp_path / f"clip.{name}"
    encode(clip, path, FORMATS[name])
    samples = decode(path, max_duration_s=60)
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert abs(samples.size - clip.size) / SAMPLE_RATE < 0.1
    assert best_correlation(envelope(samples), envelope(clip)) > 0.9
    info = probe(path, max_duration_s=60)
    assert info.codec and info.format
    if name != "vorbis.ogg":  # FFmpeg's experimental vorbis muxes wrong granule positions
        assert info.duration == pytest.approx(clip.size / SAMPLE_RATE, abs=0.1)


def test_44k_stereo_is_resampled_to_16k_mono(tmp_path: Path) -> None:
    rate, seconds = 44100, 2.0
    t = np.arange(int(rate * seconds)) / rate
    tone = 0.5 * np.sin(2 * np.pi * 440.0 * t)
    path = tmp_path / "stereo.wav"
    write_wav(path, np.stack([tone, tone], axis=1), rate=rate, channels=2)
    samples = decode(path, max_duration_s=60)
    assert abs(samples.size - seconds * SAMPLE_RATE) <= 32
    spectrum = np.abs(np.fft.rfft(samples))
    assert np.fft.rfftfreq(samples.size, 1 / SAMPLE_RATE)[np.argmax(spectrum)] == pytest.approx(
        440.0, abs=2.0
    )
    assert 0.2 < float(np.max(np.abs(samples))) <= 1.0


def test_video_file_decodes_only_its_audio(clip: Floats, tmp_path: Path) -> None:
    path = tmp_path / "talk.mkv"
    pcm = np.round(clip * 32767.0).astype(np.int16)
    step = SAMPLE_RATE // 10  # one video frame per 100 ms of audio, interleaved
    with av.open(str(path), "w", format="matroska") as out:
        video = out.add_stream("mpeg4", rate=10)
        video.width = video.height = 64
        video.pix_fmt = "yuv420p"
        audio = out.add_stream("flac", rate=SAMPLE_RATE, layout="mono")
        for start in range(0, pcm.size, step):
            image = np.full((64, 64, 3), start % 256, dtype=np.uint8)
            out.mux(video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
            chunk = pcm[None, start : start + step].copy()
            frame = av.AudioFrame.from_ndarray(chunk, format="s16", layout="mono")
            frame.sample_rate, frame.pts = SAMPLE_RATE, start
            out.mux(audio.encode(frame))
        out.mux(video.encode(None))
        out.mux(audio.encode(None))
    np.testing.assert_allclose(decode(path, max_duration_s=60), clip, atol=1e-4)
    info = probe(path, max_duration_s=60)
    assert (info.format, info.codec) == ("matroska,webm", "flac")


# -- windows --------------------------------------------------------------------------------


def collect(path: Path, **kw: float) -> list[Window]:
    return list(windows(path, **kw))


def test_windows_cover_the_file_without_gaps_or_overlap(long_wav: tuple[Path, Floats]) -> None:
    path, source = long_wav
    parts = collect(path, window_s=20, max_duration_s=3600)
    assert len(parts) >= 4
    assert [w.last for w in parts] == [False] * (len(parts) - 1) + [True]
    offset = 0.0
    for w in parts:
        assert w.samples.dtype == np.float32 and w.samples.ndim == 1
        assert 0 < w.samples.size <= 20 * SAMPLE_RATE
        assert w.offset == pytest.approx(offset, abs=1e-9)
        offset += w.samples.size / SAMPLE_RATE
    joined = np.concatenate([w.samples for w in parts])
    np.testing.assert_array_equal(joined, decode(path, max_duration_s=3600))
    np.testing.assert_allclose(joined, source, atol=1e-6)


def test_windows_are_cut_where_it_is_quiet(long_wav: tuple[Path, Floats]) -> None:
    path, source = long_wav
    parts = collect(path, window_s=20, max_duration_s=3600)
    for w in parts[:-1]:
        cut = round(w.offset * SAMPLE_RATE) + w.samples.size
        # the cut lies in the last cut_search_s (5 s) of a full window
        assert w.samples.size > 15 * SAMPLE_RATE
        around = source[cut - 800 : cut + 800]
        window_rms = float(np.sqrt(np.mean(w.samples**2)))
        assert float(np.sqrt(np.mean(around**2))) < 0.1 * window_rms


def test_windows_without_a_search_cut_at_window_s(long_wav: tuple[Path, Floats]) -> None:
    path, source = long_wav
    parts = collect(path, window_s=7.5, max_duration_s=3600, cut_search_s=0)
    assert [w.samples.size for w in parts[:-1]] == [int(7.5 * SAMPLE_RATE)] * (len(parts) - 1)
    assert sum(w.samples.size for w in parts) == source.size


def test_a_short_file_is_one_last_window(clip: Floats) -> None:
    (only,) = collect(CLIP, window_s=30, max_duration_s=60)
    assert only.offset == 0.0 and only.last
    assert only.samples.size == clip.size


# -- refusals -------------------------------------------------------------------------------


def _bad_files(tmp: Path) -> Iterator[tuple[str, Path]]:
    data = CLIP.read_bytes()
    contents = {
        "random.bin": random.Random(0).randbytes(20_000),
        "empty.wav": b"",
        "truncated.wav": data[:30],
        "notes.txt": b"Meeting notes: this is text, not audio.\n" * 40,
        "image.png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(300),
    }
    for name, content in contents.items():
        path = tmp / name
        path.write_bytes(content)
        yield name, path


def test_bad_files_are_refused(tmp_path: Path) -> None:
    for name, path in _bad_files(tmp_path):
        for call in (
            lambda p=path: probe(p, max_duration_s=60),
            lambda p=path: decode(p, max_duration_s=60),
            lambda p=path: collect(p, window_s=10, max_duration_s=60),
        ):
            with pytest.raises(InvalidRequest) as exc:
                call()
            message = refusal(exc)
            assert message.startswith("The audio file"), (name, message)
    with pytest.raises(InvalidRequest) as exc:
        probe(tmp_path / "random.bin", max_duration_s=60)
    assert f"it is not a supported audio format {ACCEPTED}" in refusal(exc)
    with pytest.raises(InvalidRequest) as exc:  # FFmpeg reads images, but not for us
        probe(tmp_path / "image.png", max_duration_s=60)
    assert f"its container is not a supported audio format {ACCEPTED}" in refusal(exc)
    video_only = tmp_path / "video_only.mkv"
    with av.open(str(video_only), "w", format="matroska") as out:
        video = out.add_stream("mpeg4", rate=10)
        video.width = video.height = 64
        video.pix_fmt = "yuv420p"
        for _ in range(3):
            image = np.zeros((64, 64, 3), dtype=np.uint8)
            out.mux(video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(video.encode(None))
    with pytest.raises(InvalidRequest) as exc:
        probe(video_only, max_duration_s=60)
    assert "no audio stream" in refusal(exc)


def test_no_samples_is_empty(tmp_path: Path) -> None:
    header_only = tmp_path / "header_only.wav"
    write_wav(header_only, np.zeros(0))
    video_only = tmp_path / "silent_track.mkv"  # an audio track that never got a packet
    with av.open(str(video_only), "w", format="matroska") as out:
        video = out.add_stream("mpeg4", rate=10)
        video.width = video.height = 64
        video.pix_fmt = "yuv420p"
        out.add_stream("libopus", rate=48000, layout="mono")
        for _ in range(5):
            image = np.zeros((64, 64, 3), dtype=np.uint8)
            out.mux(video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(video.encode(None))
    for path in (header_only, video_only):
        for call in (probe, decode):
            with pytest.raises(InvalidRequest) as exc:
                call(path, max_duration_s=60)
            assert refusal(exc) == "The audio file is empty: it holds no audio samples."


def test_a_stream_cut_off_midway_says_where(clip: Floats, tmp_path: Path) -> None:
    whole = tmp_path / "whole.flac"
    encode(clip, whole, FORMATS["flac"])
    cut = tmp_path / "cut.flac"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    got: list[Window] = []
    with pytest.raises(InvalidRequest) as exc:
        got.extend(windows(cut, window_s=0.5, max_duration_s=60, cut_search_s=0))
    message = refusal(exc)
    assert message.startswith("The audio file could not be decoded: its audio stream is corrupt")
    seconds = float(message.rsplit("at ", 1)[1].removesuffix(" s."))
    assert 0.5 < seconds < 3.0
    assert got and sum(w.samples.size for w in got) <= seconds * SAMPLE_RATE + 1


def test_probe_refuses_a_long_duration_from_metadata() -> None:
    with pytest.raises(InvalidRequest) as exc:
        probe(CLIP, max_duration_s=2)
    assert refusal(exc) == "The audio is 3.4 s long; at most 2 s is allowed."


def test_windows_refuse_too_long_audio_as_soon_as_it_is(
    clip: Floats, long_wav: tuple[Path, Floats]
) -> None:
    for path, limit, window_s in ((CLIP, 2.0, 0.5), (long_wav[0], 30.0, 10.0)):
        got: list[Window] = []
        with pytest.raises(InvalidRequest) as exc:
            got.extend(windows(path, window_s=window_s, max_duration_s=limit))
        assert (
            refusal(exc) == f"The audio is over {limit:g} s long; at most {limit:g} s is allowed."
        )
        yielded = sum(w.samples.size for w in got) / SAMPLE_RATE
        assert limit - window_s <= yielded <= limit + DURATION_SLACK_S
    with pytest.raises(InvalidRequest):
        decode(CLIP, max_duration_s=2)
    assert decode(CLIP, max_duration_s=3.4).size == clip.size  # padding slack


def test_a_format_change_midstream_gets_a_fresh_resampler() -> None:
    mono = _Mono16k()
    out: list[np.ndarray] = []
    for rate, layout, channels in ((16000, "mono", 1), (44100, "stereo", 2), (16000, "mono", 1)):
        pcm = np.full((1, rate * channels), 8192, dtype=np.int16)  # 1 s, packed
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout=layout)
        frame.sample_rate = rate
        out.extend(mono.push(frame))
    out.extend(mono.flush())
    samples = np.concatenate(out)
    assert abs(samples.size - 3 * SAMPLE_RATE) <= 64
    assert float(np.median(samples)) == pytest.approx(0.25, abs=0.01)
