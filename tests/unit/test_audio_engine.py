"""workers.audio_engine.SpeechEngine over a fake speech backend: one segment per second of
the audio it is handed, every call recorded, so batching, windowing, lane order and the
drops can be checked without a model."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from configs.catalog import CatalogEntry
from configs.settings import Settings
from tasks.errors import InvalidRequest
from tasks.queue.names import BATCH, LIVE
from tests.audio_files import SAMPLE_RATE, write_wav
from workers.audio_engine import SpeechEngine, SpeechResult, Submission
from workers.backends.audio import Segment, SpeechBackend, SpeechOptions, Transcript
from workers.jobs import Dropped

pytestmark = pytest.mark.timeout(60)

WINDOW_S = 10.0
WAIT_S = 10.0


class FakeSpeech(SpeechBackend):
    """Segment ``i`` of a call covers second ``i`` of the audio handed in (the last one
    may be shorter) and says `` c<call>s<i>``."""

    def __init__(self, batch_size: int = 8, max_clip_s: float = 30.0) -> None:
        entry = CatalogEntry(
            id="fake/whisper",
            capability="audio",
            backend="tests:FakeSpeech",
            source={"path": "/"},
            max_input_tokens=448,
            batch_token_budget=0,
            options={"batch_size": batch_size},
        )
        super().__init__(entry, device="cpu", model_path="/")
        self.max_clip_s = max_clip_s
        self.lock = threading.Lock()
        self.calls: list[tuple[int, SpeechOptions]] = []  # transcribe: (samples, options)
        self.batches: list[tuple[int, SpeechOptions]] = []  # transcribe_many: (clips, options)
        self.pulled = 0  # segments taken from transcribe's iterators
        self.delay_s = 0.0  # per transcribe_many call
        self.started = threading.Event()  # set when a transcribe_many call begins
        self.gate = threading.Event()  # transcribe_many waits for it
        self.gate.set()
        self.fail_prompt: str | None = None  # transcribe raises for this prompt
        self.segment_delay_s = 0.0  # per segment of transcribe's iterators
        self.events: list[str] = []  # "many" per transcribe_many call, "c<call>s<i>" per segment

    def load(self) -> None:
        self.warm = True

    def transcribe(self, audio: np.ndarray, options: SpeechOptions) -> Transcript:
        if self.fail_prompt is not None and options.prompt == self.fail_prompt:
            raise RuntimeError("the model broke")
        with self.lock:
            call = len(self.calls)
            self.calls.append((len(audio), options))
        return Transcript(options.language or "en", self._segments(call, len(audio)))

    def _segments(self, call: int, samples: int) -> Iterator[Segment]:
        seconds = samples / SAMPLE_RATE
        i = 0
        while i < seconds:
            time.sleep(self.segment_delay_s)
            with self.lock:
                self.pulled += 1
                self.events.append(f"c{call}s{i}")
            yield Segment(start=float(i), end=min(i + 1.0, seconds), text=f" c{call}s{i}")
            i += 1

    def transcribe_many(
        self, clips: Sequence[np.ndarray], options: SpeechOptions
    ) -> list[tuple[str, list[Segment]]]:
        with self.lock:
            self.batches.append((len(clips), options))
            self.events.append("many")
        self.started.set()
        assert self.gate.wait(WAIT_S)
        time.sleep(self.delay_s)
        return super().transcribe_many(clips, options)


def settings(**kw: Any) -> Settings:
    return Settings(models=["fake/whisper"], audio_window_s=WINDOW_S, **kw)


class Engines:
    """Engines made in a test, stopped after it whatever happens."""

    def __init__(self) -> None:
        self.made: list[SpeechEngine] = []

    def __call__(self, backend: FakeSpeech, **kw: Any) -> SpeechEngine:
        engine = SpeechEngine(backend.entry, backend, settings(), **kw)
        self.made.append(engine)
        return engine


@pytest.fixture
def engines() -> Iterator[Engines]:
    made = Engines()
    try:
        yield made
    finally:
        for engine in made.made:
            engine.stop()


def tone(seconds: float, *, seed: int = 0, gap_s: float = 0.3) -> np.ndarray:
    """Speech-like noise bursts (0.7 s) with silence between them, 16 kHz mono float."""
    rng = np.random.default_rng(seed)
    samples = np.zeros(round(seconds * SAMPLE_RATE), dtype=np.float32)
    burst = round((1.0 - gap_s) * SAMPLE_RATE)
    for start in range(0, samples.size, SAMPLE_RATE):
        n = min(burst, samples.size - start)
        samples[start : start + n] = rng.uniform(-0.3, 0.3, n).astype(np.float32)
    return samples


def wav(tmp_path: Path, name: str, seconds: float, seed: int = 0) -> str:
    return str(write_wav(tmp_path / f"{name}.wav", tone(seconds, seed=seed)))


def result(future: Future[SpeechResult]) -> SpeechResult:
    return future.result(timeout=WAIT_S)


def texts(res: SpeechResult) -> list[str]:
    return [s.text for s in res.segments]


# -- short clips -----------------------------------------------------------------------------


def test_short_clips_are_batched(tmp_path: Path, engines: Engines) -> None:
    backend = FakeSpeech(batch_size=2)
    backend.gate.clear()  # hold the first forward so every clip is queued before it ends
    engine = engines(backend)
    lengths = [1.0, 2.0, 3.0, 4.0, 5.5]
    subs = [
        Submission(wav(tmp_path, f"c{i}", s, seed=i), SpeechOptions())
        for i, s in enumerate(lengths)
    ]
    futures = engine.submit_many(subs, lane=BATCH)
    backend.gate.set()
    results = [result(f) for f in futures]
    assert [n for n, _ in backend.batches] == [2, 2, 1]
    assert sorted(n for n, _ in backend.calls) == [round(s * SAMPLE_RATE) for s in lengths]
    for seconds, res in zip(lengths, results, strict=True):
        assert res.language == "en"
        assert res.duration == pytest.approx(seconds, abs=0.01)
        assert len(res.segments) == int(np.ceil(seconds))
        assert res.segments[-1].end == pytest.approx(seconds, abs=0.01)
    # every future got its own clip's segments
    assert [len(r.segments) for r in results] == [1, 2, 3, 4, 6]
    assert engine.metrics()["items"] == 5
    assert engine.metrics()["forwards"] == 3
    assert engine.metrics()["audio_seconds"] == pytest.approx(sum(lengths), abs=0.05)


def test_clips_with_different_options_are_not_batched_together(
    tmp_path: Path, engines: Engines
) -> None:
    backend = FakeSpeech(batch_size=8)
    backend.gate.clear()
    engine = engines(backend)
    a, b = SpeechOptions(prompt="alpha"), SpeechOptions(prompt="beta")
    german = SpeechOptions(prompt="alpha", language="de")
    options = [a, b, a, german, b, a]
    subs = [Submission(wav(tmp_path, f"c{i}", 1.0, seed=i), o) for i, o in enumerate(options)]
    futures = engine.submit_many(subs, lane=LIVE)
    backend.gate.set()
    results = [result(f) for f in futures]
    assert sorted((o.prompt, o.language or "", n) for n, o in backend.batches) == [
        ("alpha", "", 3),
        ("alpha", "de", 1),
        ("beta", "", 2),
    ]
    assert [r.language for r in results] == ["en", "en", "en", "de", "en", "en"]


def test_emit_gets_a_clips_segments(tmp_path: Path, engines: Engines) -> None:
    backend = FakeSpeech()
    engine = engines(backend)
    emitted: list[list[Segment]] = []
    sub = Submission(wav(tmp_path, "c", 2.5), SpeechOptions(), emit=emitted.append)
    res = result(engine.submit_many([sub], lane=LIVE)[0])
    assert emitted == [res.segments]
    assert len(res.segments) == 3


# -- long files ------------------------------------------------------------------------------


def test_long_file_goes_window_by_window(tmp_path: Path, engines: Engines) -> None:
    backend = FakeSpeech()
    engine = engines(backend)
    seen: list[tuple[int, bool]] = []
    box: list[Future[SpeechResult]] = []

    def emit(segments: list[Segment]) -> None:
        seen.append((len(segments), bool(box) and box[0].done()))

    sub = Submission(wav(tmp_path, "long", 35.0), SpeechOptions(prompt="Glossary."), emit=emit)
    box.extend(engine.submit_many([sub], lane=BATCH))
    res = result(box[0])

    # one transcribe call per window, none of them holding more than a window of audio
    assert backend.batches == []
    assert len(backend.calls) >= 4
    sizes = [n for n, _ in backend.calls]
    assert max(sizes) <= WINDOW_S * SAMPLE_RATE
    assert sum(sizes) == 35 * SAMPLE_RATE  # no sample lost or repeated
    assert res.duration == pytest.approx(35.0, abs=0.01)
    assert res.language == "en"

    # segment times are shifted by the window's offset: they only ever increase
    starts = [s.start for s in res.segments]
    assert starts == sorted(starts)
    assert all(
        a.end <= b.start + 1e-6 for a, b in zip(res.segments, res.segments[1:], strict=False)
    )
    assert res.segments[-1].end == pytest.approx(35.0, abs=0.01)
    offsets = np.cumsum([0, *sizes[:-1]]) / SAMPLE_RATE
    firsts = [s for s in res.segments if s.text.endswith("s0")]
    assert [s.start for s in firsts] == pytest.approx(list(offsets), abs=0.002)
    assert [s.text for s in firsts] == [f" c{i}s0" for i in range(len(sizes))]

    # a stream gets every segment on its own, before the job completes
    assert len(seen) == len(res.segments)
    assert seen == [(1, False)] * len(res.segments)

    # the request's prompt for the first window, the text so far for the next ones
    assert backend.calls[0][1].prompt == "Glossary."
    for i, (_, options) in enumerate(backend.calls[1:], 1):
        assert options.prompt
        assert options.prompt.endswith(f" c{i - 1}s{int(np.ceil(sizes[i - 1] / SAMPLE_RATE)) - 1}")
        assert len(options.prompt) <= 200
        assert options.group()[:2] == ("transcribe", None)
    assert backend.calls[1][1].prompt == "".join(s.text for s in res.segments if "c0s" in s.text)


def test_long_file_yields_to_short_clips(tmp_path: Path, engines: Engines) -> None:
    """Within a lane, short clips go before the next segment of a long file."""
    backend = FakeSpeech()
    engine = engines(backend)
    long, clip = engine.submit_many(
        [
            Submission(wav(tmp_path, "long", 25.0), SpeechOptions()),
            Submission(wav(tmp_path, "clip", 1.0), SpeechOptions()),
        ],
        lane=BATCH,
    )
    assert result(long).duration == pytest.approx(25.0, abs=0.01)
    assert len(result(clip).segments) == 1
    # the long file's first window was started (call 0) but none of its segments was
    # computed before the clip's forward (call 1)
    assert backend.events[:2] == ["many", "c1s0"]
    assert "c0s0" in backend.events


def test_clip_longer_than_max_clip_is_a_window(tmp_path: Path, engines: Engines) -> None:
    backend = FakeSpeech(max_clip_s=2.0)
    engine = engines(backend)
    res = result(
        engine.submit_many([Submission(wav(tmp_path, "c", 3.0), SpeechOptions())], lane=LIVE)[0]
    )
    assert backend.batches == []
    assert [n for n, _ in backend.calls] == [3 * SAMPLE_RATE]
    assert len(res.segments) == 3


# -- lanes -----------------------------------------------------------------------------------


def test_live_goes_first(tmp_path: Path, engines: Engines) -> None:
    backend = FakeSpeech(batch_size=2)
    backend.delay_s = 0.15
    backend.gate.clear()
    engine = engines(backend)
    order: list[str] = []
    subs = [Submission(wav(tmp_path, f"b{i}", 1.0, seed=i), SpeechOptions()) for i in range(8)]
    batch = engine.submit_many(subs, lane=BATCH)
    for i, f in enumerate(batch):
        f.add_done_callback(lambda _, i=i: order.append(f"batch{i}"))
    assert backend.started.wait(WAIT_S)  # the first batch forward is running
    [live] = engine.submit_many(
        [Submission(wav(tmp_path, "live", 1.0), SpeechOptions())], lane=LIVE
    )
    live.add_done_callback(lambda _: order.append("live"))
    backend.gate.set()
    result(live)
    for f in batch:
        result(f)
    assert order == ["batch0", "batch1", "live", *[f"batch{i}" for i in range(2, 8)]]
    assert [n for n, _ in backend.batches] == [2, 1, 2, 2, 2]


def test_live_goes_before_a_long_batch_file(tmp_path: Path, engines: Engines) -> None:
    backend = FakeSpeech()
    # 0.3 s for the long file: a busy machine that delays this thread by a few ms must
    # not let it finish before the live job is sent
    backend.segment_delay_s = 0.01
    engine = engines(backend)
    [long] = engine.submit_many(
        [Submission(wav(tmp_path, "long", 30.0), SpeechOptions())], lane=BATCH
    )
    deadline = time.monotonic() + WAIT_S
    while backend.pulled < 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    [live] = engine.submit_many(
        [Submission(wav(tmp_path, "live", 1.0), SpeechOptions())], lane=LIVE
    )
    result(live)
    assert not long.done()
    assert result(long).duration == pytest.approx(30.0, abs=0.01)


# -- drops -----------------------------------------------------------------------------------


class Gone:
    def __init__(self, ids: set[str]) -> None:
        self.ids = ids
        self.asked: list[list[str]] = []

    def __call__(self, request_ids: list[str]) -> set[str]:
        self.asked.append(list(request_ids))
        return self.ids & set(request_ids)


def test_gone_live_job_is_dropped(tmp_path: Path, engines: Engines) -> None:
    backend = FakeSpeech()
    backend.gate.clear()
    gone = Gone({"req-gone"})
    engine = engines(backend, gone=gone)
    path = wav(tmp_path, "c", 1.0)
    futures = engine.submit_many(
        [
            Submission(path, SpeechOptions(), request_id="req-gone", sent_at=time.time() - 1),
            Submission(path, SpeechOptions(), request_id="req-here", sent_at=time.time() - 1),
        ],
        lane=LIVE,
    )
    backend.gate.set()
    with pytest.raises(Dropped):
        futures[0].result(timeout=WAIT_S)
    assert len(result(futures[1]).segments) == 1
    assert gone.asked
    assert all(set(ids) <= {"req-gone", "req-here"} for ids in gone.asked)
    assert sum(n for n, _ in backend.batches) == 1


def test_gone_is_not_asked_for_batch_jobs(tmp_path: Path, engines: Engines) -> None:
    backend = FakeSpeech(batch_size=1)
    gone = Gone({"req-0", "req-1", "req-2"})
    engine = engines(backend, gone=gone)
    subs = [
        Submission(wav(tmp_path, f"c{i}", 1.0), SpeechOptions(), request_id=f"req-{i}", sent_at=0.0)
        for i in range(3)
    ]
    long = Submission(wav(tmp_path, "long", 15.0), SpeechOptions(), request_id="req-2", sent_at=0.0)
    futures = engine.submit_many([*subs, long], lane=BATCH)
    for f in futures:
        result(f)
    assert gone.asked == []


def test_fresh_live_jobs_skip_the_gone_lookup(tmp_path: Path, engines: Engines) -> None:
    backend = FakeSpeech()
    gone = Gone({"req-new"})
    engine = engines(backend, gone=gone)
    sub = Submission(
        wav(tmp_path, "c", 1.0), SpeechOptions(), request_id="req-new", sent_at=time.time() + 60
    )
    assert len(result(engine.submit_many([sub], lane=LIVE)[0]).segments) == 1
    assert gone.asked == []


def test_gone_while_a_long_live_file_runs(tmp_path: Path, engines: Engines) -> None:
    backend = FakeSpeech()
    backend.segment_delay_s = 0.01  # 40 segments: longer than a few gone look-ups
    gone = Gone(set())
    engine = engines(backend, gone=gone)
    sub = Submission(wav(tmp_path, "long", 40.0), SpeechOptions(), request_id="r", sent_at=0.0)
    [future] = engine.submit_many([sub], lane=LIVE)
    deadline = time.monotonic() + WAIT_S
    while backend.pulled < 1 and time.monotonic() < deadline:
        time.sleep(0.001)
    gone.ids.add("r")
    with pytest.raises(Dropped):
        future.result(timeout=WAIT_S)
    assert sum(n for n, _ in backend.calls) < 40 * SAMPLE_RATE  # it stopped early


def test_live_deadline_passed(tmp_path: Path, engines: Engines) -> None:
    backend = FakeSpeech()
    engine = engines(backend)
    path = wav(tmp_path, "c", 1.0)
    late, on_time = engine.submit_many(
        [
            Submission(path, SpeechOptions(), deadline=time.time() - 1),
            Submission(path, SpeechOptions(), deadline=time.time() + 60),
        ],
        lane=LIVE,
    )
    with pytest.raises(Dropped):
        late.result(timeout=WAIT_S)
    assert len(result(on_time).segments) == 1
    assert sum(n for n, _ in backend.batches) == 1


def test_batch_deadline_is_not_checked(tmp_path: Path, engines: Engines) -> None:
    backend = FakeSpeech()
    engine = engines(backend)
    sub = Submission(wav(tmp_path, "c", 1.0), SpeechOptions(), deadline=time.time() - 1)
    assert len(result(engine.submit_many([sub], lane=BATCH)[0]).segments) == 1


# -- failures --------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"this is not audio" * 100])
def test_undecodable_file_fails_alone(tmp_path: Path, engines: Engines, content: bytes) -> None:
    backend = FakeSpeech()
    engine = engines(backend)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(content)
    subs = [
        Submission(wav(tmp_path, "a", 1.0), SpeechOptions()),
        Submission(str(bad), SpeechOptions()),
        Submission(wav(tmp_path, "b", 2.0), SpeechOptions()),
        Submission(wav(tmp_path, "long", 12.0), SpeechOptions()),
    ]
    first, broken, second, long = engine.submit_many(subs, lane=BATCH)
    with pytest.raises(InvalidRequest) as info:
        broken.result(timeout=WAIT_S)
    assert info.value.param == "file"
    assert len(result(first).segments) == 1
    assert len(result(second).segments) == 2
    assert result(long).duration == pytest.approx(12.0, abs=0.01)


def test_missing_file_fails_alone(tmp_path: Path, engines: Engines) -> None:
    engine = engines(FakeSpeech())
    missing, ok = engine.submit_many(
        [
            Submission(str(tmp_path / "nope.wav"), SpeechOptions()),
            Submission(wav(tmp_path, "a", 1.0), SpeechOptions()),
        ],
        lane=LIVE,
    )
    with pytest.raises(InvalidRequest) as info:
        missing.result(timeout=WAIT_S)
    assert info.value.param == "file"
    assert len(result(ok).segments) == 1


def test_failing_forward_fails_its_batch_only(tmp_path: Path, engines: Engines) -> None:
    backend = FakeSpeech()
    backend.fail_prompt = "boom"
    engine = engines(backend)
    bad, good = engine.submit_many(
        [
            Submission(wav(tmp_path, "a", 1.0), SpeechOptions(prompt="boom")),
            Submission(wav(tmp_path, "b", 1.0), SpeechOptions()),
        ],
        lane=BATCH,
    )
    with pytest.raises(RuntimeError, match="the model broke"):
        bad.result(timeout=WAIT_S)
    assert len(result(good).segments) == 1


def test_failing_first_window_of_a_long_file_fails_alone(tmp_path: Path, engines: Engines) -> None:
    backend = FakeSpeech()
    backend.fail_prompt = "boom"
    engine = engines(backend)
    clip, long = engine.submit_many(
        [
            Submission(wav(tmp_path, "a", 1.0), SpeechOptions()),
            Submission(wav(tmp_path, "long", 15.0), SpeechOptions(prompt="boom")),
        ],
        lane=BATCH,
    )
    try:
        with pytest.raises(RuntimeError, match="the model broke"):
            long.result(timeout=2)
        assert len(clip.result(timeout=2).segments) == 1
    finally:
        engine.stop()


def test_gone_lookup_failing_does_not_fail_the_job(tmp_path: Path, engines: Engines) -> None:
    def broken(request_ids: list[str]) -> set[str]:
        raise ConnectionError("redis hiccup")

    engine = engines(FakeSpeech(), gone=broken)
    sub = Submission(wav(tmp_path, "c", 1.0), SpeechOptions(), request_id="r", sent_at=0.0)
    assert len(result(engine.submit_many([sub], lane=LIVE)[0]).segments) == 1


def test_queued_long_files_are_not_all_opened(tmp_path: Path, engines: Engines) -> None:
    backend = FakeSpeech(batch_size=2)
    backend.segment_delay_s = 0.002
    engine = engines(backend)
    subs = [Submission(wav(tmp_path, f"l{i}", 25.0, seed=i), SpeechOptions()) for i in range(8)]
    first = engine.submit_many(subs, lane=BATCH)[0]
    result(first)
    with engine._cond:
        opened = sum(1 for j in engine.queues[BATCH] if j.opened)
    assert opened <= 2


def test_emit_failing_fails_its_own_job(tmp_path: Path, engines: Engines) -> None:
    backend = FakeSpeech()
    backend.segment_delay_s = 0.01
    engine = engines(backend)
    [long] = engine.submit_many([Submission(wav(tmp_path, "l", 20.0), SpeechOptions())], lane=LIVE)
    deadline = time.monotonic() + WAIT_S
    while backend.pulled < 2 and time.monotonic() < deadline:
        time.sleep(0.001)

    def broken(segments: list[Segment]) -> None:
        raise RuntimeError("stream broke")

    sub = Submission(wav(tmp_path, "c", 1.0), SpeechOptions(), emit=broken)
    [clip] = engine.submit_many([sub], lane=LIVE)
    with pytest.raises(RuntimeError):
        clip.result(timeout=2)
    assert result(long).duration == pytest.approx(20.0, abs=0.01)


# -- stop ------------------------------------------------------------------------------------


def test_stop_fails_queued_jobs(tmp_path: Path) -> None:
    backend = FakeSpeech(batch_size=1)
    backend.gate.clear()
    engine = SpeechEngine(backend.entry, backend, settings())
    try:
        subs = [Submission(wav(tmp_path, f"c{i}", 1.0, seed=i), SpeechOptions()) for i in range(3)]
        futures = engine.submit_many(subs, lane=BATCH)
        # the live job arrives once the first batch clip is in its forward: sent any
        # earlier, the scheduler may (rightly) take it first and finish it before stop
        assert backend.started.wait(WAIT_S)
        long = Submission(wav(tmp_path, "long", 20.0), SpeechOptions())
        futures += engine.submit_many([long], lane=LIVE)
        stopper = threading.Thread(target=engine.stop)
        stopper.start()
        deadline = time.monotonic() + WAIT_S
        while not engine._stopped and time.monotonic() < deadline:
            time.sleep(0.001)
        backend.gate.set()  # the running forward finishes; nothing else starts
        stopper.join(WAIT_S)
        assert not stopper.is_alive()
    finally:
        backend.gate.set()
        engine.stop()
    assert len(result(futures[0]).segments) == 1
    for future in futures[1:]:
        with pytest.raises(Dropped):
            future.result(timeout=0)
    assert len(backend.batches) == 1
