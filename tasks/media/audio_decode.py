"""Uploaded audio files decoded with PyAV into mono float32 at 16 kHz, in bounded memory.

Speech models want 16 kHz mono samples; uploads come as wav, mp3, m4a, flac, ogg or webm,
often long. PyAV carries its own FFmpeg, so no system ``ffmpeg`` is needed. No torch: the
API process imports this module (``probe``, a cheap check before a job is enqueued) and
so do the workers (``windows``, ``decode``).

Only single-file audio containers are opened: FFmpeg's ``wav``, ``mp3``, ``mov`` (m4a,
mp4, mov), ``flac``, ``ogg`` and ``matroska`` (webm, mkv) demuxers (``ALLOWED_DEMUXERS``,
FFmpeg's ``format_whitelist``). Everything else is refused before its header is parsed, above
all the demuxers that name other files or URLs (concat lists, HLS and DASH playlists, SDP,
RTSP): an upload must never make the server read another tenant's file, a local path or a
URL. The file is handed to FFmpeg as an open Python file with ``protocol_whitelist`` set to
no protocol at all, so nothing a container says can open a second input, and the ``mov``
demuxer's external data references (``enable_drefs``) stay off.

``windows`` streams: it holds about one window of samples, never the whole file, and cuts
each window at its quietest 100 ms so words are rarely split. Every failure the caller
can fix (not audio, no audio stream, empty, corrupt, too long) is an ``InvalidRequest``
on the ``file`` parameter; no PyAV exception escapes. A missing path is the server's
fault, not the caller's: it stays a ``FileNotFoundError``.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import av
import numpy as np
import numpy.typing as npt
from av.audio.frame import AudioFrame
from av.audio.stream import AudioStream
from av.container import InputContainer

from tasks.errors import InvalidRequest

SAMPLE_RATE = 16000
PARAM = "file"
SUPPORTED_FORMATS = "wav, mp3, m4a/mp4/mov, flac, ogg, webm/mkv"
# FFmpeg demuxers (``format_whitelist``) an upload may be opened with: single-file audio
# containers only, none that can refer to another file or URL
ALLOWED_DEMUXERS = ("wav", "mp3", "mov", "flac", "ogg", "matroska")
_OPEN_OPTIONS = {
    "format_whitelist": ",".join(ALLOWED_DEMUXERS),
    "protocol_whitelist": "none",  # no nested input: the file is read through Python
    "enable_drefs": "0",  # mov: never open a track's data from an external file
    "use_absolute_path": "0",
}
# codecs pad: an mp3 or aac file decodes to up to a few tens of ms more than was encoded,
# so a file of exactly the allowed length is not refused for its padding
DURATION_SLACK_S = 0.25
# the quietest stretch a window is cut in, and the step the search moves by
_CUT_BLOCK = SAMPLE_RATE // 10
_CUT_HOP = SAMPLE_RATE // 100
# what PyAV raises for a file it cannot read (its errors also subclass OSError/ValueError)
_AV_ERRORS = (av.FFmpegError, OSError, ValueError, EOFError)

Samples = npt.NDArray[np.float32]

NOT_AUDIO = (
    "The audio file could not be decoded: it is not a supported audio format "
    f"({SUPPORTED_FORMATS})."
)
NO_AUDIO_STREAM = (
    "The audio file could not be decoded: it holds no audio stream. Send audio in a "
    f"supported format ({SUPPORTED_FORMATS})."
)
NOT_ALLOWED = (
    "The audio file could not be decoded: its container is not a supported audio format "
    f"({SUPPORTED_FORMATS}); playlists, concat lists and other files that refer to other "
    "files or URLs are not allowed."
)
EMPTY_FILE = "The audio file is empty (0 bytes)."
EMPTY_AUDIO = "The audio file is empty: it holds no audio samples."


@dataclass(frozen=True)
class AudioInfo:
    duration: float | None  # seconds from container/stream metadata, None when unknown
    format: str  # container format name as PyAV reports it ("wav", "matroska,webm", ...)
    codec: str  # audio codec name ("pcm_s16le", "mp3float", "aac", ...)


@dataclass(frozen=True, eq=False)
class Window:
    offset: float  # seconds from the start of the file
    samples: Samples  # float32 mono 16 kHz, 1-D
    last: bool  # no more windows follow


def _refuse(message: str) -> InvalidRequest:
    return InvalidRequest(message, param=PARAM)


def _too_long(seconds: float, max_duration_s: float) -> InvalidRequest:
    return _refuse(f"The audio is {seconds:.1f} s long; at most {max_duration_s:g} s is allowed.")


def _over_limit(max_duration_s: float) -> InvalidRequest:
    return _refuse(
        f"The audio is over {max_duration_s:g} s long; at most {max_duration_s:g} s is allowed."
    )


@contextmanager
def _open_audio(path: str | os.PathLike[str]) -> Iterator[tuple[InputContainer, AudioStream]]:
    """The opened container and its first audio stream; closed on exit."""
    name = os.fspath(path)
    if os.path.getsize(name) == 0:  # a missing file raises FileNotFoundError here
        raise _refuse(EMPTY_FILE)
    with open(name, "rb") as file:  # a file object: FFmpeg opens no protocol for it
        try:
            container = av.open(
                file, mode="r", container_options=_OPEN_OPTIONS, metadata_errors="ignore"
            )
        except av.error.ArgumentError as exc:  # EINVAL: a demuxer not on the whitelist
            raise _refuse(NOT_ALLOWED) from exc
        except _AV_ERRORS as exc:
            raise _refuse(NOT_AUDIO) from exc
        with container:
            if not container.streams.audio:
                raise _refuse(NO_AUDIO_STREAM)
            yield container, container.streams.audio[0]


class _Mono16k:
    """``av.AudioResampler`` to float32 mono 16 kHz, rebuilt when the input changes format,
    layout or rate mid-stream (which one resampler refuses)."""

    def __init__(self) -> None:
        self._resampler: av.AudioResampler | None = None
        self._key: tuple[str, str, int] | None = None

    def push(self, frame: AudioFrame) -> list[Samples]:
        key = (frame.format.name, frame.layout.name, frame.sample_rate)
        out: list[Samples] = []
        if self._resampler is None or key != self._key:
            out = self.flush()
            self._resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            self._key = key
        out.extend(_arrays(self._resampler.resample(frame)))
        return out

    def flush(self) -> list[Samples]:
        if self._resampler is None:
            return []
        out = _arrays(self._resampler.resample(None))
        self._resampler = None
        return out


def _arrays(frames: list[AudioFrame]) -> list[Samples]:
    out: list[Samples] = []
    for frame in frames:
        if frame.samples:
            out.append(frame.to_ndarray().reshape(-1).astype(np.float32, copy=False))
    return out


def _chunks(container: InputContainer, stream: AudioStream) -> Generator[Samples, None, None]:
    """The stream's samples, converted, in decoder-sized chunks. A demux or decode error
    (a corrupt or cut stream) becomes an ``InvalidRequest`` naming the second it hit."""
    mono = _Mono16k()
    done = 0
    try:
        for frame in container.decode(stream):
            for chunk in mono.push(frame):
                done += chunk.size
                yield chunk
        for chunk in mono.flush():
            done += chunk.size
            yield chunk
    except _AV_ERRORS as exc:
        raise _refuse(
            "The audio file could not be decoded: its audio stream is corrupt or cut off "
            f"at {done / SAMPLE_RATE:.1f} s."
        ) from exc


def _metadata_duration(container: InputContainer, stream: AudioStream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def probe(path: str | os.PathLike[str], *, max_duration_s: float) -> AudioInfo:
    """Cheap check in the API before enqueueing: the file opens, has an audio stream, and
    its first audio frame decodes; a metadata duration over ``max_duration_s`` is refused.
    Not audio, empty, truncated in its header, too long: ``InvalidRequest``."""
    with _open_audio(path) as (container, stream):
        info = AudioInfo(
            duration=_metadata_duration(container, stream),
            format=container.format.name,
            codec=stream.codec_context.name,
        )
        if info.duration is not None and info.duration > max_duration_s + DURATION_SLACK_S:
            raise _too_long(info.duration, max_duration_s)
        chunks = _chunks(container, stream)
        try:
            if next(chunks, None) is None:
                raise _refuse(EMPTY_AUDIO)
        finally:
            chunks.close()
    return info


def _quietest_cut(head: Samples, search: int) -> int:
    """Where to end a window of ``head``: the middle of its quietest 100 ms (lowest RMS)
    within its last ``search`` samples, the latest one on a tie; its end if none fits."""
    start = head.size - search
    region = head[start:].astype(np.float64)
    if region.size < _CUT_BLOCK:
        return head.size
    energy = np.concatenate(([0.0], np.cumsum(region * region)))
    starts = np.arange(0, region.size - _CUT_BLOCK + 1, _CUT_HOP)
    sums = energy[starts + _CUT_BLOCK] - energy[starts]
    best = starts.size - 1 - int(np.argmin(sums[::-1]))
    return start + int(starts[best]) + _CUT_BLOCK // 2


def windows(
    path: str | os.PathLike[str],
    *,
    window_s: float,
    max_duration_s: float,
    cut_search_s: float = 5.0,
) -> Iterator[Window]:
    """The file decoded in windows of at most ``window_s`` seconds, streaming: memory holds
    about one window. Each window but the last ends at the quietest 100 ms of its last
    ``cut_search_s`` seconds; the rest starts the next window, so no sample is lost or
    repeated. ``InvalidRequest`` once the decoded audio passes ``max_duration_s`` (before
    any window past it is yielded), when no sample decodes, or when decoding fails."""
    if window_s <= 0 or cut_search_s < 0:
        raise ValueError("window_s must be > 0 and cut_search_s >= 0")
    window = max(1, round(window_s * SAMPLE_RATE))
    search = min(window, round(cut_search_s * SAMPLE_RATE))
    limit = (max_duration_s + DURATION_SLACK_S) * SAMPLE_RATE
    with _open_audio(path) as (container, stream):
        pending: list[Samples] = []
        buffered = emitted = 0
        for chunk in _chunks(container, stream):
            if emitted + buffered + chunk.size > limit:
                raise _over_limit(max_duration_s)
            pending.append(chunk)
            buffered += chunk.size
            # more than a window: a sample always remains, so this window is not the last
            while buffered > window:
                audio = np.concatenate(pending)
                cut = _quietest_cut(audio[:window], search)
                yield Window(emitted / SAMPLE_RATE, audio[:cut], last=False)
                emitted += cut
                pending = [audio[cut:].copy()]
                buffered = audio.size - cut
        if not buffered:
            raise _refuse(EMPTY_AUDIO)
        yield Window(emitted / SAMPLE_RATE, np.concatenate(pending), last=True)


def decode(path: str | os.PathLike[str], *, max_duration_s: float) -> Samples:
    """The whole file as one array (for short clips): the concatenation of ``windows``."""
    parts = windows(path, window_s=max_duration_s + 1.0, max_duration_s=max_duration_s)
    return np.concatenate([w.samples for w in parts])
