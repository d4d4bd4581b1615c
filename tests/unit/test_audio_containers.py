"""tasks/media/audio_decode.py opens only single-file audio containers, and nothing a file says
can make FFmpeg open another file or a URL.

Every upload lives in ``files/`` of the store (``files/file-<id>``), so a concat list or a
playlist uploaded as ``user_data`` could name another tenant's object by its relative name
and have it transcribed through a Batch API line that names only the attacker's own file.
Each case here is built at test time in a directory laid out like the store: ``file-A`` is
a real recording (the victim's), the attack file sits next to it; a local HTTP server and
a UDP socket stand where a URL or an RTP stream would be, and must never hear a thing.
"""

from __future__ import annotations

import http.server
import shutil
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest
from av.audio.stream import AudioStream

from tasks.errors import InvalidRequest
from tasks.media.audio_decode import (
    ALLOWED_DEMUXERS,
    EMPTY_AUDIO,
    NOT_ALLOWED,
    NOT_AUDIO,
    Window,
    decode,
    probe,
    windows,
)
from tests.audio_files import CLIPS, read_wav

VICTIM = CLIPS / "clip01.wav"


@dataclass
class Targets:
    """What an attack file may try to reach."""

    victim: Path  # files/file-A: another tenant's upload
    url: str  # served by a local HTTP server that records every request
    udp_port: int  # a bound UDP socket that records every datagram
    http_hits: list[str]
    udp: socket.socket

    def heard(self) -> list[object]:
        got: list[object] = list(self.http_hits)
        while True:
            try:
                got.append(self.udp.recvfrom(65536))
            except BlockingIOError:
                return got


@pytest.fixture
def targets(tmp_path: Path) -> Iterator[Targets]:
    files = tmp_path / "files"
    files.mkdir()
    victim = files / "file-A"
    shutil.copy(VICTIM, victim)
    hits: list[str] = []
    body = VICTIM.read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    try:
        yield Targets(
            victim=victim,
            url=f"http://127.0.0.1:{server.server_address[1]}/x.wav",
            udp_port=udp.getsockname()[1],
            http_hits=hits,
            udp=udp,
        )
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        udp.close()


def _hls(segment: str) -> str:
    return (
        "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:4\n"
        f"#EXTINF:3.4,\n{segment}\n#EXT-X-ENDLIST\n"
    )


def _dash(url: str) -> str:
    return (
        '<?xml version="1.0"?><MPD xmlns="urn:mpeg:dash:schema:mpd:2011" type="static" '
        'mediaPresentationDuration="PT3.4S" profiles="urn:mpeg:dash:profile:isoff-on-demand:2011">'
        '<Period><AdaptationSet mimeType="audio/wav"><Representation id="a" bandwidth="256000">'
        f"<BaseURL>{url}</BaseURL></Representation></AdaptationSet></Period></MPD>"
    )


def _sdp(port: int) -> str:
    return (
        "v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nt=0 0\n"
        f"m=audio {port} RTP/AVP 0\na=rtpmap:0 PCMU/8000\n"
    )


# (id, the attack file's name in files/, its text, whether FFmpeg recognises the demuxer:
# then the refusal must say the container is not allowed; a DASH manifest needs a demuxer
# this PyAV build lacks, and an HLS playlist without its extension is not recognised)
Attack = tuple[str, str, Callable[[Targets], str], bool]
ATTACKS: list[Attack] = [
    ("ffconcat-relative", "file-B", lambda t: "ffconcat version 1.0\nfile 'file-A'\n", True),
    ("ffconcat-absolute", "file-B", lambda t: f"ffconcat version 1.0\nfile '{t.victim}'\n", True),
    (
        "ffconcat-file-url",
        "file-B",
        lambda t: f"ffconcat version 1.0\nfile 'file:{t.victim}'\n",
        True,
    ),
    ("ffconcat-http", "file-B", lambda t: f"ffconcat version 1.0\nfile '{t.url}'\n", True),
    ("hls-relative", "file-B.m3u8", lambda t: _hls("file-A"), True),
    ("hls-file-url", "file-B.m3u8", lambda t: _hls(f"file:{t.victim}"), True),
    ("hls-http", "file-B.m3u8", lambda t: _hls(t.url), True),
    ("hls-as-stored", "file-B", lambda t: _hls(t.url), False),
    ("dash-manifest", "file-B.mpd", lambda t: _dash(t.url), False),
    ("sdp-rtp", "file-B.sdp", lambda t: _sdp(t.udp_port), True),
    ("ffmetadata", "file-B", lambda t: ";FFMETADATA1\ntitle=x\n", True),
]


def _refusals(path: Path) -> list[str]:
    """The messages of ``probe``, ``decode`` and ``windows`` for ``path``; each must refuse
    with an ``InvalidRequest`` on ``file`` and yield no window first."""
    messages = []
    got: list[Window] = []
    for call in (
        lambda: probe(path, max_duration_s=60),
        lambda: decode(path, max_duration_s=60),
        lambda: got.extend(windows(path, window_s=10, max_duration_s=60)),
    ):
        with pytest.raises(InvalidRequest) as refused:
            call()
        assert refused.value.param == "file"
        messages.append(refused.value.message)
    assert got == []
    return messages


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: a[0])
def test_a_file_that_names_other_inputs_is_refused(targets: Targets, attack: Attack) -> None:
    _, name, text, recognised = attack
    path = targets.victim.parent / name
    path.write_text(text(targets))
    for message in _refusals(path):
        if recognised:
            assert message == NOT_ALLOWED
        else:
            assert message in (NOT_ALLOWED, NOT_AUDIO)
    assert targets.heard() == []


def test_the_refusal_says_what_is_accepted() -> None:
    assert (
        "not a supported audio format (wav, mp3, m4a/mp4/mov, flac, ogg, webm/mkv)" in NOT_ALLOWED
    )
    assert "refer to other files or URLs" in NOT_ALLOWED
    assert ALLOWED_DEMUXERS == ("wav", "mp3", "mov", "flac", "ogg", "matroska")


# -- mov: external data references ------------------------------------------------------------


def _boxes(data: bytes | bytearray, start: int, end: int) -> Iterator[tuple[int, int, bytes]]:
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        yield pos, size, kind
        pos += size


def _alias(target: str) -> bytes:
    """A QuickTime ``alis`` data reference to ``target`` in the movie's own directory (one
    level up from the alias, one down to the target), laid out as FFmpeg's mov demuxer
    reads it: volume, file name, levels, then a type-2 (absolute, ':'-separated) path."""
    path = f"vol:elsewhere:{target}".encode()
    path += b"\0" * (len(path) % 2)
    body = (
        bytes(10)
        + bytes([0])  # volume name length
        + bytes(27)
        + bytes(12)
        + bytes([len(target)])
        + target.encode().ljust(63, b"\0")
        + bytes(16)
        + struct.pack(">hh", 1, 1)  # nlvl_from, nlvl_to
        + bytes(16)
        + struct.pack(">HH", 2, len(path))
        + path
        + struct.pack(">HH", 0xFFFF, 0)
    )
    return struct.pack(">I4sI", 12 + len(body), b"alis", 0) + body


def mov_reading_another_file(path: Path, samples: int, target: str) -> int:
    """A mov whose one track is ``samples`` of silence in its own mdat but whose data
    reference points at ``target`` next to it: with FFmpeg's ``enable_drefs`` the track's
    bytes come from ``target``. Returns where the track's data starts (in either file)."""
    silence = av.AudioFrame.from_ndarray(
        np.zeros((1, samples), np.int16), format="s16", layout="mono"
    )
    silence.sample_rate = 16000
    with av.open(str(path), "w", format="mov") as out:
        stream = out.add_stream("pcm_s16le", rate=16000, layout="mono")
        assert isinstance(stream, AudioStream)
        out.mux(stream.encode(silence))
        out.mux(stream.encode(None))
    data = bytearray(path.read_bytes())
    [mdat] = [pos for pos, _, kind in _boxes(data, 0, len(data)) if kind == b"mdat"]
    parents: list[int] = []
    start, end = 0, len(data)
    for name in (b"moov", b"trak", b"mdia", b"minf", b"dinf", b"dref"):
        [(pos, size)] = [(p, s) for p, s, k in _boxes(data, start, end) if k == name]
        parents.append(pos)
        start, end = pos + 8, pos + size
    dref = parents.pop()
    old_size = struct.unpack(">I", data[dref : dref + 4])[0]
    alias = _alias(target)
    new = struct.pack(">I4sII", 16 + len(alias), b"dref", 0, 1) + alias
    data[dref : dref + old_size] = new
    for pos in parents:  # the boxes around it grow; the mdat before them does not move
        size = struct.unpack(">I", data[pos : pos + 4])[0]
        data[pos : pos + 4] = struct.pack(">I", size + len(new) - old_size)
    path.write_bytes(bytes(data))
    return mdat + 8


def test_a_mov_data_reference_to_another_file_is_never_followed(targets: Targets) -> None:
    victim = read_wav(targets.victim)
    attack = targets.victim.parent / "file-B"
    start = mov_reading_another_file(attack, victim.size, "file-A")
    # the control: with FFmpeg's enable_drefs the file really reads the victim's samples
    # (from the same offset in file-A, whose samples start after its 44-byte header)
    with av.open(str(attack), container_options={"enable_drefs": "1"}) as c:
        leaked = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    shift = (44 - start) // 2
    assert shift >= 0 and (44 - start) % 2 == 0
    pcm = np.round(victim * 32768.0).astype(np.int16)
    np.testing.assert_array_equal(leaked[shift:], pcm[: leaked.size - shift])
    # ours: references stay off, so the track has no data of its own to decode
    assert _refusals(attack) == [EMPTY_AUDIO] * 3
    assert targets.heard() == []


# -- what is accepted ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("muxer", "codec", "demuxer"),
    [
        ("mov", "pcm_s16le", "mov"),
        ("mp4", "aac", "mov"),
        ("matroska", "pcm_s16le", "matroska"),
        ("webm", "libopus", "matroska"),
        ("wav", "pcm_s16le", "wav"),
    ],
)
def test_each_accepted_container_decodes(
    tmp_path: Path, muxer: str, codec: str, demuxer: str
) -> None:
    clip = read_wav(VICTIM)
    frame = av.AudioFrame.from_ndarray(
        np.round(clip * 32767.0).astype(np.int16)[None, :], format="s16", layout="mono"
    )
    frame.sample_rate = 16000
    path = tmp_path / "upload"  # stored without an extension, as every upload is
    with av.open(str(path), "w", format=muxer) as out:
        stream = out.add_stream(codec, rate=16000, layout="mono")
        assert isinstance(stream, AudioStream)
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    info = probe(path, max_duration_s=60)
    assert demuxer in info.format.split(",")
    assert abs(decode(path, max_duration_s=60).size - clip.size) < 0.1 * 16000
