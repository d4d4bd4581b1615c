"""workers/audio.py ``batch_executor``: a Batch API line's ``user_data`` file is held to the
live route's limits and checks before it reaches the model.

A live upload over ``LANEWAY_AUDIO_MAX_BYTES`` is a 413, one whose header says it is over
``LANEWAY_AUDIO_MAX_DURATION_S`` a 400, one that is not an allowed container a 400; a batch
line naming such a file gets the same error as its line, with the same message, and the
others of its chunk go on. No process, no model: a real SQLite database and file store, a
fake engine that records what reached it.
"""

from __future__ import annotations

import io
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from configs.settings import Settings
from tasks.contracts.audio import too_large
from tasks.filestore import FileStore, get_file_store
from tasks.media.audio_decode import NOT_ALLOWED
from tasks.store.files import create_file
from tests.audio_files import CLIPS, read_wav, write_wav
from workers.audio import batch_executor
from workers.audio_engine import SpeechResult, Submission

TINY = "Systran/faster-whisper-tiny.en"
MAX_BYTES = 64 * 1024  # about 2 s of 16 kHz 16-bit mono
MAX_S = 1.5


class RecordingEngine:
    """Answers every submission at once, and keeps them."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def submit_many(self, subs: list[Submission], lane: Any) -> list[Future[SpeechResult]]:
        futures = []
        for sub in subs:
            self.paths.append(sub.path)
            future: Future[SpeechResult] = Future()
            future.set_result(SpeechResult("en", 1.0, []))
            futures.append(future)
        return futures


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = RecordingEngine()

    def engine_as(self, model: str, kind: type) -> RecordingEngine:
        return self.engine


@pytest.fixture
def settings(tmp_path: Path, db: None) -> Settings:
    return Settings(
        models=[TINY],
        data_dir=tmp_path / "data",
        file_store=str(tmp_path / "store"),
        audio_max_bytes=MAX_BYTES,
        audio_max_duration_s=MAX_S,
    )


def user_file(store: FileStore, data: bytes, owner: str | None = "alice") -> str:
    made = create_file(
        store=store,
        source=io.BytesIO(data),
        filename="audio.bin",
        purpose="user_data",
        max_bytes=10 * 1024 * 1024,
        owner=owner,
    )
    return str(made["id"])


def wav_bytes(tmp_path: Path, seconds: float) -> bytes:
    clip = read_wav(CLIPS / "clip01.wav")
    samples = np.resize(clip, int(seconds * 16000))
    return write_wav(tmp_path / f"{seconds}.wav", samples).read_bytes()


def run(settings: Settings, files: list[str], owner: str | None = "alice") -> tuple[Any, Runtime]:
    runtime = Runtime(settings)
    execute = batch_executor(runtime)  # type: ignore[arg-type]
    bodies = [{"model": TINY, "file": f} for f in files]
    outcomes = execute(TINY, bodies, [f"req_{i}" for i in range(len(files))], owner)
    return outcomes, runtime


def test_a_line_over_the_size_limit_is_the_live_413(settings: Settings, tmp_path: Path) -> None:
    store = get_file_store(settings)
    short = user_file(store, wav_bytes(tmp_path, 1.0))
    big = wav_bytes(tmp_path, 3.0)
    assert len(big) > MAX_BYTES
    large = user_file(store, big)
    outcomes, runtime = run(settings, [short, large, short])
    assert [o.status_code for o in outcomes] == [200, 413, 200]
    assert outcomes[1].body == too_large(MAX_BYTES).body()
    error = outcomes[1].body["error"]
    assert error["message"] == f"The audio file is larger than the limit of {MAX_BYTES} bytes"
    assert (error["param"], error["code"]) == ("file", "request_too_large")
    assert len(runtime.engine.paths) == 2  # the large file never reached the model


def test_a_line_longer_than_the_limit_is_refused_before_it_is_transcribed(
    settings: Settings, tmp_path: Path
) -> None:
    store = get_file_store(settings)
    ok = user_file(store, wav_bytes(tmp_path, 1.0))
    long = user_file(store, wav_bytes(tmp_path, 1.9))  # under the byte limit, over 1.5 s
    outcomes, runtime = run(settings, [long, ok])
    assert [o.status_code for o in outcomes] == [400, 200]
    # the live route's words: the API's probe reads the same header
    error = outcomes[0].body["error"]
    assert error["message"] == f"The audio is 1.9 s long; at most {MAX_S:g} s is allowed."
    assert error["param"] == "file"
    assert len(runtime.engine.paths) == 1


def test_a_concat_list_naming_another_tenants_audio_is_refused(
    settings: Settings, tmp_path: Path
) -> None:
    store = get_file_store(settings)
    victim = user_file(store, wav_bytes(tmp_path, 1.0), owner="bob")
    concat = f"ffconcat version 1.0\nfile '{victim}'\n".encode()
    attack = user_file(store, concat, owner="alice")
    mine = user_file(store, wav_bytes(tmp_path, 1.0), owner="alice")
    outcomes, runtime = run(settings, [attack, victim, mine], owner="alice")
    assert [o.status_code for o in outcomes] == [400, 400, 200]
    assert outcomes[0].body["error"]["message"] == NOT_ALLOWED
    assert outcomes[1].body["error"]["message"] == f"No such File object: {victim!r}"
    assert [o.body["error"]["param"] for o in outcomes[:2]] == ["file", "file"]
    assert len(runtime.engine.paths) == 1


def test_one_bad_file_named_by_many_lines_fails_each_of_them(
    settings: Settings, tmp_path: Path
) -> None:
    store = get_file_store(settings)
    attack = user_file(store, b"ffconcat version 1.0\nfile 'x'\n")
    good = user_file(store, wav_bytes(tmp_path, 1.0))
    outcomes, runtime = run(settings, [attack, good, attack])
    assert [o.status_code for o in outcomes] == [400, 200, 400]
    assert runtime.engine.paths and all(Path(p).exists() for p in runtime.engine.paths)
