"""One chat model on a worker: continuous batching over one shared KV cache.

Requests (``ChatJob``, one sequence per choice) wait in two queues, live and batch. One
scheduler thread per model loops:

1. **admit** waiting jobs between decode steps: live jobs first, in arrival order; a
   batch job only while no live job waits (so no batch sequence is admitted ahead of a
   live one), within ``max_running`` sequences and the token budget (prompt plus
   ``max_tokens`` of every running sequence, the cache it may grow to);
2. **prefill** the admitted sequences in one forward and merge their cache into the
   running batch (``workers.backends.chat.merge``);
3. **sample** one token per running sequence (greedy at temperature 0, else top-p with a
   per-request generator, penalties, log-probabilities), detect the end (EOS, a stop
   string, ``max_tokens``), stream the new text of streaming jobs;
4. drop finished sequences from the batch, and those whose caller hung up (checked every
   few steps), then **decode** the rest in one forward.

On a device out-of-memory the newest half of the running jobs goes back to the front of
its queue (each resumes later by prefilling its prompt and what it generated so far,
so no request fails for it), and the running batch stays at most that size for
``chat_oom_cooldown_s``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from configs.catalog import CatalogEntry
from configs.settings import Settings
from tasks.chat import ChatLimits, check_context
from tasks.chat_bodies import TokenLogprob, logprob_entry
from tasks.errors import LanewayError
from tasks.names import BATCH, LIVE, Lane
from workers.backends import load_backend
from workers.backends.chat import Batch, ChatBackend, OutOfMemory, Prompt, merge, select
from workers.batching import (
    FRESH_S,
    Dropped,
    ForwardStats,
    GoneCheck,
    JobMeta,
    failed,
)

log = logging.getLogger(__name__)

GONE_EVERY_S = 0.05  # how often running live requests are checked for a hung-up caller
Emit = Callable[[list[dict[str, Any]]], None]  # a streaming job's new choice deltas


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False
    top_logprobs: int = 0

    @classmethod
    def from_work(cls, work: dict[str, Any]) -> Sampling:
        return cls(
            max_tokens=int(work["max_tokens"]),
            temperature=float(work.get("temperature", 1.0)),
            top_p=float(work.get("top_p", 1.0)),
            n=int(work.get("n", 1)),
            stop=tuple(str(s) for s in work.get("stop") or ()),
            seed=work.get("seed"),
            presence_penalty=float(work.get("presence_penalty", 0.0)),
            frequency_penalty=float(work.get("frequency_penalty", 0.0)),
            logprobs=bool(work.get("logprobs", False)),
            top_logprobs=int(work.get("top_logprobs", 0)),
        )


@dataclass(frozen=True)
class Submission:
    """One request for ``ChatEngine.submit_many``."""

    work: dict[str, Any]
    images: Sequence[bytes] = ()
    meta: JobMeta = field(default_factory=JobMeta)
    emit: Emit | None = None


@dataclass
class ChatResult:
    choices: list[dict[str, Any]]  # {index, text, finish_reason, logprobs}
    prompt_tokens: int
    completion_tokens: int


@dataclass(eq=False)
class Choice:
    job: ChatJob
    index: int
    generated: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of ``text`` already streamed
    finish_reason: str | None = None
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    fresh_logprobs: int = 0  # logprobs not streamed yet
    closed: bool = False  # its finish has been streamed

    def resume_prompt(self) -> Prompt:
        return Prompt(self.job.prompt.ids + self.generated, self.job.prompt.extra)


@dataclass(eq=False)
class ChatJob:
    sampling: Sampling
    prompt: Prompt
    lane: Lane
    meta: JobMeta
    emit: Emit | None = None
    future: Future[ChatResult] = field(default_factory=Future)
    choices: list[Choice] = field(default_factory=list)
    generator: torch.Generator | None = None
    arrived: float = field(default_factory=time.monotonic)

    @property
    def reserve(self) -> int:
        """The cache tokens its sequences may grow to."""
        return (len(self.prompt.ids) + self.sampling.max_tokens) * self.sampling.n


class ChatEngine:
    def __init__(
        self, backend: ChatBackend, settings: Settings, *, gone: GoneCheck | None = None
    ) -> None:
        self.entry = backend.entry
        self.backend = backend
        self.limits = ChatLimits.from_entry(backend.entry)
        self.token_budget = max(backend.entry.batch_token_budget, self.limits.context_length)
        self.cooldown_s = settings.chat_oom_cooldown_s
        self.gone = gone
        self.stats = ForwardStats()
        self.tokens_out = 0
        self.preempted = 0  # jobs sent back to wait (for a live one, or out of memory)
        self._live: deque[ChatJob] = deque()
        self._batch: deque[ChatJob] = deque()
        self._running: list[Choice] = []  # in the order of the batch's rows
        self._state: Batch | None = None
        self._logits: torch.Tensor | None = None  # the running rows' next-token logits
        self._cap = self.limits.max_running
        self._cap_until = 0.0
        self._gone_at = 0.0
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(
            target=self._loop, name=f"chat-{self.entry.id}", daemon=True
        )
        self._thread.start()

    @classmethod
    def load(
        cls, entry: CatalogEntry, settings: Settings, *, device: str, gone: GoneCheck | None
    ) -> ChatEngine:
        backend = load_backend(entry, settings, device=device, kind=ChatBackend)  # type: ignore[type-abstract]
        return cls(backend, settings, gone=gone)

    @property
    def warm(self) -> bool:
        return self.backend.warm

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=5)

    def metrics(self) -> dict[str, Any]:
        return {
            **self.stats.snapshot(),
            "completion_tokens": self.tokens_out,
            "preempted": self.preempted,
        }

    # -- submission ---------------------------------------------------------------------

    def submit(
        self,
        work: dict[str, Any],
        *,
        images: Sequence[bytes] = (),
        lane: Lane = LIVE,
        meta: JobMeta | None = None,
        emit: Emit | None = None,
    ) -> Future[ChatResult]:
        """Render and check one request, queue it; its future completes when every
        choice has finished (``emit`` gets each step's new text before that)."""
        [future] = self.submit_many([Submission(work, images, meta or JobMeta(), emit)], lane=lane)
        return future

    def submit_many(
        self, submissions: Sequence[Submission], *, lane: Lane = LIVE
    ) -> list[Future[ChatResult]]:
        """Several requests queued at once (rendered first, then one lock and one wake-up),
        so that requests that arrive together are admitted, and prefilled, together."""
        futures: list[Future[ChatResult]] = []
        jobs: list[ChatJob] = []
        for sub in submissions:
            try:
                job = self._job(sub.work, sub.images, lane, sub.meta, sub.emit)
            except LanewayError as exc:
                futures.append(failed(exc))
                continue
            jobs.append(job)
            futures.append(job.future)
        if jobs:
            with self._cond:
                (self._batch if lane == BATCH else self._live).extend(jobs)
                self._cond.notify()
        return futures

    def _job(
        self,
        work: dict[str, Any],
        images: Sequence[bytes],
        lane: Lane,
        meta: JobMeta,
        emit: Emit | None,
    ) -> ChatJob:
        sampling = Sampling.from_work(work)
        prompt = self.backend.render(work["messages"], images)
        check_context(len(prompt.ids), sampling.max_tokens, self.limits.context_length)
        job = ChatJob(sampling, prompt, lane, meta, emit)
        job.choices = [Choice(job, i) for i in range(sampling.n)]
        if sampling.temperature > 0:
            job.generator = torch.Generator(device="cpu")
            if sampling.seed is not None:
                job.generator.manual_seed(int(sampling.seed))
            else:
                job.generator.seed()
        return job

    # -- the scheduler ------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and not self._running and not self._waiting():
                    self._cond.wait()
                if self._stopped:
                    return
                admitted, preempt = self._admit()
            try:
                if preempt:
                    self._preempt(preempt)
                if admitted:
                    self._prefill(admitted)
                if self._running:
                    self._step()
            except Exception as exc:  # a bug or a broken forward: fail what runs, go on
                log.exception("chat step failed for %s", self.entry.id)
                self._fail_running(exc)

    def _waiting(self) -> bool:
        return bool(self._live or self._batch)

    def _admit(self) -> tuple[list[ChatJob], list[ChatJob]]:
        """(jobs to start now, running batch jobs to preempt for them); holds the lock.
        Live first; batch only when no live job waits. A live job that finds no room
        preempts running batch jobs, newest first: they go back to wait and resume later
        by prefilling what they had generated, so a live request never waits for a
        batch sequence to finish."""
        if self._cap_until and time.monotonic() > self._cap_until:
            self._cap, self._cap_until = self.limits.max_running, 0.0
        running = list({c.job: None for c in self._running})
        rows = sum(j.sampling.n for j in running)
        used = sum(j.reserve for j in running)
        preempt: list[ChatJob] = []
        taken: list[ChatJob] = []

        def fits(job: ChatJob) -> bool:
            if rows == 0 and not taken:
                return True  # alone, it runs whatever its size
            return rows + job.sampling.n <= self._cap and used + job.reserve <= self.token_budget

        for queue in (self._live, self._batch):
            if queue is self._batch and self._live:
                break  # a live job still waits for room: nothing is admitted ahead of it
            while queue:
                job = queue[0]
                if queue is self._live:
                    for victim in reversed(running):
                        if fits(job):
                            break
                        if victim.lane == BATCH and victim not in preempt:
                            preempt.append(victim)
                            rows -= victim.sampling.n
                            used -= victim.reserve
                if not fits(job):
                    break
                queue.popleft()
                if job.future.done():  # dropped while it waited
                    continue
                taken.append(job)
                rows += job.sampling.n
                used += job.reserve
        return taken, preempt

    def _preempt(self, jobs: list[ChatJob]) -> list[int]:
        """Take ``jobs`` out of the running batch and put them back first in their queue
        (each resumes later by prefilling what it had generated). The rows kept."""
        gone = set(jobs)
        keep = [i for i, c in enumerate(self._running) if c.job not in gone]
        index = torch.as_tensor(keep, dtype=torch.long)
        self._state = select(self._state, keep) if keep and self._state is not None else None
        self._logits = self._logits[index] if keep and self._logits is not None else None
        self._running = [self._running[i] for i in keep]
        self.preempted += len(jobs)
        self._requeue(jobs)
        return keep

    def _prefill(self, jobs: list[ChatJob]) -> None:
        jobs = self._drop_gone(jobs, force=True)
        choices = [c for j in jobs for c in j.choices if c.finish_reason is None]
        if not choices:
            return
        for job in jobs:
            if not any(c.generated for c in job.choices):  # not a preempted one resuming
                self.stats.waited(job.lane, job.meta.sent_at, job.arrived)
        began = time.perf_counter()
        try:
            logits, batch = self.backend.prefill([c.resume_prompt() for c in choices])
        except OutOfMemory:
            if len(jobs) == 1:
                raise
            half = len(jobs) // 2
            self._requeue(jobs[half:])
            self._prefill(jobs[:half])
            return
        self.stats.record(len(choices), time.perf_counter() - began)
        self._state = merge(self._state, batch)
        self._logits = logits if self._logits is None else torch.cat([self._logits, logits])
        self._running.extend(choices)

    def _step(self) -> None:
        assert self._logits is not None and self._state is not None
        tokens, logprobs = self._sample(self._logits)
        for row, choice in enumerate(self._running):
            self._advance(choice, tokens[row], logprobs[row] if logprobs else None)
        emitted = False
        for job in {c.job: None for c in self._running}:
            emitted |= self._publish(job)
        if emitted:
            time.sleep(0)  # let the reply writer send them before the next forward
        self._drop_gone([c.job for c in self._running])
        keep = [i for i, c in enumerate(self._running) if c.finish_reason is None]
        if not keep:
            self._running, self._state, self._logits = [], None, None
            return
        if len(keep) < len(self._running):
            self._state = select(self._state, keep)
            self._running = [self._running[i] for i in keep]
        self._decode(torch.as_tensor([tokens[i] for i in keep], dtype=torch.long))

    def _decode(self, tokens: torch.Tensor) -> None:
        """One decode step. Out of memory: the newest half of the running jobs goes back
        to wait (``_preempt``) and the running batch stays at most the other half for the
        cooldown; a single request that does not fit alone fails."""
        assert self._state is not None
        while True:
            try:
                began = time.perf_counter()
                self._logits = self.backend.decode(self._state, tokens)
                self.stats.record(len(self._running), time.perf_counter() - began)
                return
            except OutOfMemory:
                jobs = list({c.job: None for c in self._running})
                if len(jobs) == 1:
                    raise
                # the decode appended the mask column before it failed: undo it
                self._state.mask = self._state.mask[:, :-1]
                self._logits = None  # the last step's, already sampled
                keep = self._preempt(jobs[len(jobs) // 2 :])
                self._cap = len(keep)
                self._cap_until = time.monotonic() + self.cooldown_s
                log.warning(
                    "out of memory on %s: running batch capped at %d", self.entry.id, self._cap
                )
                assert self._state is not None
                tokens = tokens[torch.as_tensor(keep, dtype=torch.long)]

    def _requeue(self, jobs: list[ChatJob]) -> None:
        with self._cond:
            for job in reversed(jobs):
                (self._batch if job.lane == BATCH else self._live).appendleft(job)

    # -- tokens -------------------------------------------------------------------------

    def _sample(self, logits: torch.Tensor) -> tuple[list[int], list[Any] | None]:
        """One token per row, and (when any row asks) each row's log-probabilities."""
        rows = self._running
        want_logprobs = any(c.job.sampling.logprobs for c in rows)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        scores = logits.clone()
        for row, choice in enumerate(rows):
            s = choice.job.sampling
            if (s.presence_penalty or s.frequency_penalty) and choice.generated:
                _penalise(scores[row], choice.generated, s)
        tokens = scores.argmax(dim=-1).tolist()
        for row, choice in enumerate(rows):
            s = choice.job.sampling
            if s.temperature > 0:
                tokens[row] = _draw(scores[row], s, choice.job.generator)
        if raw_logprobs is None:
            return tokens, None
        return tokens, [
            self._logprob(raw_logprobs[row], tokens[row], rows[row].job.sampling)
            if rows[row].job.sampling.logprobs
            else None
            for row in range(len(rows))
        ]

    def _logprob(self, logprobs: torch.Tensor, token: int, s: Sampling) -> dict[str, Any]:
        chosen = TokenLogprob(self.backend.token_text(token), float(logprobs[token]))
        top: list[TokenLogprob] = []
        if s.top_logprobs:
            values, ids = torch.topk(logprobs, s.top_logprobs)
            top = [
                TokenLogprob(self.backend.token_text(int(i)), float(v))
                for v, i in zip(values.tolist(), ids.tolist(), strict=True)
            ]
        return logprob_entry(chosen, top)

    def _advance(self, choice: Choice, token: int, logprob: dict[str, Any] | None) -> None:
        """Append ``token`` to ``choice`` and decide whether it is finished. The text is
        decoded each step only when it is needed then (a stream, stop strings)."""
        s = choice.job.sampling
        choice.generated.append(token)
        self.tokens_out += 1
        if logprob is not None:
            choice.logprobs.append(logprob)
            choice.fresh_logprobs += 1
        if token in self.backend.eos_ids:
            choice.text = self.backend.text(choice.generated)
            choice.finish_reason = "stop"
            return
        total = len(choice.job.prompt.ids) + len(choice.generated)
        done = len(choice.generated) >= s.max_tokens or total >= self.limits.context_length
        if not (done or s.stop or choice.job.emit is not None):
            return
        text = self.backend.text(choice.generated)
        for stop in s.stop:
            at = text.find(stop, max(choice.sent - len(stop), 0))
            if at >= 0:
                choice.text, choice.finish_reason = text[:at], "stop"
                return
        choice.text = text
        if done:
            choice.finish_reason = "length"

    def _publish(self, job: ChatJob) -> bool:
        """Stream the new text of a streaming job; complete the job once all is done.
        True when it sent something."""
        sent = False
        if job.emit is not None:
            deltas = [d for c in job.choices if (d := _delta(c)) is not None]
            if deltas:
                job.emit(deltas)
                sent = True
        if all(c.finish_reason is not None for c in job.choices) and not job.future.done():
            job.future.set_result(
                ChatResult(
                    [
                        {
                            "index": c.index,
                            "text": c.text,
                            "finish_reason": c.finish_reason,
                            "logprobs": c.logprobs if job.sampling.logprobs else None,
                        }
                        for c in job.choices
                    ],
                    prompt_tokens=len(job.prompt.ids),
                    completion_tokens=sum(len(c.generated) for c in job.choices),
                )
            )
            sent = True
        return sent

    # -- callers that went away -----------------------------------------------------------

    def _drop_gone(self, jobs: list[ChatJob], *, force: bool = False) -> list[ChatJob]:
        """``jobs`` less those whose caller hung up or whose deadline passed (failed with
        ``Dropped``; their sequences finish now, so the next step frees their rows)."""
        now = time.monotonic()
        if not force and now - self._gone_at < GONE_EVERY_S:
            return jobs
        self._gone_at = now
        unique = list({j: None for j in jobs})
        wall = time.time()
        # a deadline is the latest start: a running stream is ended by its caller instead
        dead = {
            j
            for j in unique
            if j.meta.deadline is not None
            and j.meta.deadline < wall
            and not any(c.generated for c in j.choices)
        }
        # a caller cannot have hung up on a request sent moments ago: no round trip for it
        ids = [
            j.meta.request_id
            for j in unique
            if j.meta.request_id
            and j.lane == LIVE
            and (j.meta.sent_at is None or wall - j.meta.sent_at > FRESH_S)
        ]
        if ids and self.gone is not None:
            try:
                gone = self.gone([i for i in ids if i])
            except Exception:
                log.exception("could not check for departed callers")
                gone = set()
            dead |= {j for j in unique if j.meta.request_id in gone}
        for job in dead:
            for c in job.choices:
                c.finish_reason = c.finish_reason or "stop"
            if not job.future.done():
                job.future.set_exception(Dropped(job.meta.request_id or "job"))
        return [j for j in jobs if j not in dead]

    def _fail_running(self, exc: Exception) -> None:
        for choice in self._running:
            if not choice.job.future.done():
                choice.job.future.set_exception(exc)
        self._running, self._state, self._logits = [], None, None


def _penalise(scores: torch.Tensor, generated: list[int], s: Sampling) -> None:
    """OpenAI's presence and frequency penalties, over the tokens generated so far."""
    ids = torch.as_tensor(generated, dtype=torch.long)
    counts = torch.bincount(ids, minlength=scores.shape[0])[: scores.shape[0]].to(scores.dtype)
    scores -= counts * s.frequency_penalty + (counts > 0).to(scores.dtype) * s.presence_penalty


def _draw(scores: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> int:
    """A token drawn at ``temperature`` from the smallest set of mass ``top_p``."""
    probs = torch.softmax(scores / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > s.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def _delta(choice: Choice) -> dict[str, Any] | None:
    """The text of ``choice`` not streamed yet, less what may still turn out to be the
    start of a stop string or half of a character; everything once it has finished."""
    if choice.closed:
        return None
    text, end = choice.text, len(choice.text)
    if choice.finish_reason is None:
        hold = max((len(s) for s in choice.job.sampling.stop), default=1) - 1
        end = max(end - hold, choice.sent)
        while end > choice.sent and text[end - 1] == "\ufffd":
            end -= 1
    if end <= choice.sent and choice.finish_reason is None and not choice.fresh_logprobs:
        return None
    delta: dict[str, Any] = {"index": choice.index, "text": text[choice.sent : end]}
    if choice.fresh_logprobs:
        delta["logprobs"] = choice.logprobs[-choice.fresh_logprobs :]
        choice.fresh_logprobs = 0
    if choice.finish_reason is not None:
        delta["finish_reason"] = choice.finish_reason
        choice.closed = True
    choice.sent = end
    return delta
