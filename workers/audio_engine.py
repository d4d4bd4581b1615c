"""The speech scheduler: one thread per model that decodes, batches and transcribes.

A job is one request's audio file (a file-store path). It is opened (its first window
decoded, ``tasks.media.audio_decode.windows``) when it nears the head of its lane's queue:

- a **short clip** (one window, at most the backend's ``max_clip_s``) waits, decoded, for
  a batched forward: every step takes up to ``batch_size`` short clips with equal
  options from the lane and transcribes them together (``transcribe_many``);
- a **long file** is transcribed window by window, and each window segment by segment
  (the backend's lazy segments): one step advances one segment, sends it to a stream at
  once, and decodes the next window only when the last one is done, so the worker holds
  one window of audio per job, never the file.

Each step serves the live lane if it holds any job (a live request waits behind at most
one batched forward or one segment of batch work), else the batch lane; within a lane,
short clips go before the next segment of a long file. Live jobs whose caller has gone,
or whose deadline passed before they started, are dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from configs import tracing
from configs.catalog import CatalogEntry
from configs.settings import Settings
from tasks.errors import InvalidRequest, LanewayError
from tasks.media.audio_decode import Window, windows
from tasks.queue.names import BATCH, LIVE, Lane
from workers.backends import load_backend
from workers.backends.audio import SAMPLE_RATE, Segment, SpeechBackend, SpeechOptions, Transcript
from workers.jobs import Dropped, ForwardStats, GoneCheck, JobMeta, Throttle, departed

if TYPE_CHECKING:
    from opentelemetry.context import Context

log = logging.getLogger(__name__)

PROMPT_TAIL_CHARS = 200  # the previous window's text that prompts the next window

Emit = Callable[[list[Segment]], None]


@dataclass(frozen=True)
class SpeechResult:
    language: str
    duration: float  # seconds of audio
    segments: list[Segment]


@dataclass(frozen=True)
class Submission:
    path: str
    options: SpeechOptions
    request_id: str | None = None
    deadline: float | None = None
    sent_at: float | None = None
    emit: Emit | None = None
    trace: Context | None = field(default=None, compare=False, repr=False)


@dataclass(eq=False)
class SpeechJob:
    sub: Submission
    lane: Lane
    future: Future[SpeechResult] = field(default_factory=Future)
    windows: Iterator[Window] | None = None  # None: not opened yet
    clip: np.ndarray | None = None  # a short clip waiting for a batched forward
    transcript: Transcript | None = None  # the window being transcribed (long files)
    offset: float = 0.0  # the current window's start in the file
    last_window: bool = False
    duration: float = 0.0  # seconds decoded so far
    language: str = ""
    segments: list[Segment] = field(default_factory=list)
    arrived: float = field(default_factory=time.monotonic)
    meta: JobMeta = field(init=False)

    def __post_init__(self) -> None:
        sub = self.sub
        self.meta = JobMeta(sub.request_id, sub.deadline, sub.sent_at, sub.trace)

    @property
    def opened(self) -> bool:
        return self.windows is not None

    @property
    def answering(self) -> bool:
        """Opened: its deadline, the latest start, no longer applies
        (``workers.jobs.departed``)."""
        return self.opened

    def close(self) -> None:
        close = getattr(self.windows, "close", None)
        if close is not None:
            close()


class SpeechEngine:
    def __init__(
        self,
        entry: CatalogEntry,
        backend: SpeechBackend,
        settings: Settings,
        *,
        gone: GoneCheck | None = None,
    ) -> None:
        self.entry = entry
        self.backend = backend
        self.settings = settings
        self.gone = gone
        self.queues: dict[Lane, deque[SpeechJob]] = {LIVE: deque(), BATCH: deque()}
        self.stats = ForwardStats()
        self.audio_seconds = 0.0
        self._cond = threading.Condition()
        self._stopped = False
        self._gone_due = Throttle()  # live callers are looked up every GONE_EVERY_S
        self._thread = threading.Thread(target=self._loop, name=f"speech-{entry.id}", daemon=True)
        self._thread.start()

    @classmethod
    def load(
        cls, entry: CatalogEntry, settings: Settings, *, device: str, gone: GoneCheck | None
    ) -> SpeechEngine:
        backend = load_backend(entry, settings, device=device, kind=SpeechBackend)  # type: ignore[type-abstract]
        return cls(entry, backend, settings, gone=gone)

    @property
    def warm(self) -> bool:
        return self.backend.warm

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout=10)

    def metrics(self) -> dict[str, Any]:
        return {**self.stats.snapshot(), "audio_seconds": self.audio_seconds}

    def submit_many(self, subs: Sequence[Submission], *, lane: Lane) -> list[Future[SpeechResult]]:
        jobs = [SpeechJob(sub, lane) for sub in subs]
        with self._cond:
            if self._stopped:
                for job in jobs:
                    job.future.set_exception(Dropped("worker stopping"))
            else:
                self.queues[lane].extend(jobs)
                self._cond.notify_all()
        return [job.future for job in jobs]

    # -- the scheduler thread ------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and not any(self.queues.values()):
                    self._cond.wait()
                if self._stopped:
                    break
                lane = LIVE if self.queues[LIVE] else BATCH
            self._step(lane)  # a job's failure fails that job (``_guarded``), never the loop
        with self._cond:
            for queue in self.queues.values():
                for job in queue:
                    self._fail(job, Dropped("worker stopping"), remove=False)
                queue.clear()

    def _step(self, lane: Lane) -> None:
        if lane == LIVE:
            self._drop_gone()
        with self._cond:
            queue = list(self.queues[lane])
        batch_size = max(1, self.backend.batch_size)
        # at most batch_size jobs of a lane hold decoded audio (a clip or one window)
        room = batch_size - sum(1 for j in queue if j.opened)
        for job in [j for j in queue if not j.opened][: max(0, room)]:
            self._guarded(job, self._open)
        with self._cond:
            queue = list(self.queues[lane])
        clips = [j for j in queue if j.clip is not None]
        if clips:
            group = clips[0].sub.options.group()
            self._run_clips([j for j in clips if j.sub.options.group() == group][:batch_size])
            return
        running = next((j for j in queue if j.transcript is not None), None)
        if running is not None:
            self._guarded(running, self._advance)

    def _guarded(self, job: SpeechJob, step: Callable[[SpeechJob], None]) -> None:
        """``step(job)``; whatever it raises (a decode error, the backend, a stream's
        sink) fails ``job`` alone."""
        try:
            step(job)
        except FileNotFoundError:  # deleted meanwhile (its caller's, or a batch's file)
            self._fail(job, InvalidRequest("The audio file was deleted.", param="file"))
        except Exception as exc:
            if not isinstance(exc, LanewayError):
                log.exception("audio request %s failed", job.sub.request_id)
            self._fail(job, exc)

    def _open(self, job: SpeechJob) -> None:
        """Decode the job's first window: a short clip, or the start of a long file."""
        self.stats.waited(job.lane, job.sub.sent_at, job.arrived)
        job.windows = windows(
            job.sub.path,
            window_s=self.settings.audio_window_s,
            max_duration_s=self.settings.audio_max_duration_s,
        )
        first = next(job.windows)
        self._enter(job, first)
        if first.last and len(first.samples) <= self.backend.max_clip_s * SAMPLE_RATE:
            job.clip = first.samples
            return
        self._start_window(job, first)

    def _enter(self, job: SpeechJob, window: Window) -> None:
        job.offset, job.last_window = window.offset, window.last
        job.duration = window.offset + len(window.samples) / SAMPLE_RATE

    def _start_window(self, job: SpeechJob, window: Window) -> None:
        options = job.sub.options
        if job.segments:  # the text so far prompts the next window (as within a window)
            tail = "".join(s.text for s in job.segments)[-PROMPT_TAIL_CHARS:]
            options = replace(options, prompt=tail)
        job.transcript = self.backend.transcribe(window.samples, options)
        job.language = job.language or job.transcript.language

    def _run_clips(self, jobs: list[SpeechJob]) -> None:
        clips = [j.clip for j in jobs if j.clip is not None]
        began = time.perf_counter()
        try:
            results = self.backend.transcribe_many(clips, jobs[0].sub.options)
        except Exception as exc:
            for job in jobs:
                self._fail(job, exc)
            return
        took = time.perf_counter() - began
        self.stats.record(len(jobs), took)
        if tracing.TRACER is not None:
            parents = [job.meta.trace for job in jobs]
            tracing.forward_spans(parents, took, len(jobs), model=self.entry.id)
        for job, (language, segments) in zip(jobs, results, strict=True):
            job.clip, job.language = None, language
            job.segments = list(segments)
            self._guarded(job, self._emit_all)

    def _emit_all(self, job: SpeechJob) -> None:
        if job.sub.emit is not None and job.segments:
            job.sub.emit(list(job.segments))
        self._finish(job)

    def _advance(self, job: SpeechJob) -> None:
        """One more segment of a long file (or its next window, or its end)."""
        assert job.transcript is not None and job.windows is not None
        began = time.perf_counter()
        segment = next(job.transcript.segments, None)
        if segment is None:
            if job.last_window:
                self._finish(job)
                return
            window = next(job.windows)
            self._enter(job, window)
            self._start_window(job, window)
            return
        took = time.perf_counter() - began
        self.stats.record(1, took)  # one segment: the unit of work
        if tracing.TRACER is not None:
            tracing.forward_spans([job.meta.trace], took, 1, model=self.entry.id, name="segment")
        segment = segment.shifted(job.offset)
        job.segments.append(segment)
        if job.sub.emit is not None:
            job.sub.emit([segment])

    # -- endings -------------------------------------------------------------------------

    def _finish(self, job: SpeechJob) -> None:
        self._remove(job)
        self.audio_seconds += job.duration
        result = SpeechResult(job.language or "en", job.duration, job.segments)
        if not job.future.done():
            job.future.set_result(result)

    def _fail(self, job: SpeechJob, exc: BaseException, *, remove: bool = True) -> None:
        if remove:
            self._remove(job)
        if not job.future.done():
            job.future.set_exception(exc)

    def _remove(self, job: SpeechJob) -> None:
        job.close()
        job.clip = job.transcript = None
        with self._cond:
            queue = self.queues[job.lane]
            if job in queue:
                queue.remove(job)

    def _drop_gone(self) -> None:
        """Before a live step, fail the live jobs ``departed`` names: a deadline that
        passed before the job was opened, a future done outside, or a caller that hung up
        (looked up at most every ``GONE_EVERY_S``). Batch jobs have no caller waiting."""
        with self._cond:
            jobs = list(self.queues[LIVE])
        if not jobs:
            return
        gone = self.gone if self.gone is not None and self._gone_due.due() else None
        for job, error in departed(jobs, gone).items():
            self._fail(job, error)
