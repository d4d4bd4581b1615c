"""One chat model on a worker: continuous batching over one shared KV cache.

Requests (``ChatJob``, one sequence per choice) wait in two queues, live and batch. One
scheduler thread per model loops:

1. **admit** waiting jobs between decode steps: live jobs first, in arrival order; a
   batch job only while no live job waits or starts (so no batch sequence is admitted
   ahead of a live one, nor prefilled beside it to delay its first token), at most
   ``batch_prefill_tokens`` prompt tokens of them per step (a wave of finished batch
   rows refills over a few steps, and a live request that arrives meanwhile waits for
   one small prefill, not for the whole wave), within ``max_running`` sequences and the
   token budget. The budget counts
   the cache the batch may grow to: the cache is left-padded, so every row is as wide
   as the widest, and that is rows x the largest prompt plus ``max_tokens``. A live job
   that finds no room preempts running batch jobs, newest first, but only when that
   makes it fit; otherwise it waits and nothing is preempted;
2. **prefill** the admitted sequences in one forward; their cache joins the running
   batch's (``workers.backends.chat.merge``, a copy of the whole cache) only after step 3
   has sent their first tokens;
3. **sample** one token per running sequence, batched on the logits' device (penalties,
   temperature, top-p, log-probabilities: ``workers.chat_sampling``) and read back in
   one copy: greedy at temperature 0, else a draw with a generator on that device, a
   seeded request's its own (so its tokens do not depend on the rest of the batch);
   then detect the end (EOS, a stop string, ``max_tokens``) and stream the new text of
   streaming jobs;
4. drop finished sequences from the batch, and those whose caller hung up (checked every
   few steps), then **decode** the rest in one forward.

On a device out-of-memory in a decode, the cache is cut back to its width before the
step (``workers.backends.chat.rollback``: the layers that ran had appended their
column), the newest half of the running jobs goes back to the front of its queue (each
resumes later by prefilling its prompt and what it generated so far, so no request
fails for it), and the running batch stays at most that size for
``chat_oom_cooldown_s``. A prefill that runs out of memory with several jobs halves
the same way.

Every job's future completes, whatever happens: a prefill that fails (out of memory
with a single job, or any other error) fails exactly its own jobs, and the running
batch, which shares no cache with it, goes on; a step that fails fails the running
jobs; ``stop`` fails whatever is still waiting or running (``ServiceUnavailable``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

import torch

from configs import tracing
from configs.catalog import CatalogEntry
from configs.settings import Settings
from tasks.contracts.chat import ChatLimits, check_context
from tasks.contracts.chat_bodies import TokenLogprob, logprob_entry
from tasks.errors import LanewayError, ServiceUnavailable
from tasks.queue.names import BATCH, LIVE, Lane
from workers.backends import load_backend
from workers.backends.chat import (
    Batch,
    ChatBackend,
    OutOfMemory,
    Prompt,
    merge,
    rollback,
    select,
)
from workers.chat_sampling import Sampling, pick, row_index, to_host
from workers.jobs import ForwardStats, GoneCheck, JobMeta, Throttle, departed, failed

log = logging.getLogger(__name__)

Emit = Callable[[list[dict[str, Any]]], None]  # a streaming job's new choice deltas


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
    # how often each token was generated (vocab,), on the logits' device, for penalties;
    # built on the first penalised step (again after a preemption), see ``chat_sampling``
    counts: torch.Tensor | None = field(default=None, repr=False)

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
    # a seeded request's own generator, made on the logits' device at its first draw
    generator: torch.Generator | None = None
    arrived: float = field(default_factory=time.monotonic)

    @property
    def answering(self) -> bool:
        """Whether a token of it has come (``workers.jobs.departed``: its deadline no
        longer applies)."""
        return any(c.generated for c in self.choices)

    @property
    def prefill_tokens(self) -> int:
        """The tokens its start prefills: each unfinished choice's prompt and what it had
        generated before a preemption."""
        prompt = len(self.prompt.ids)
        return sum(prompt + len(c.generated) for c in self.choices if c.finish_reason is None)

    @property
    def width(self) -> int:
        """The cache columns each of its rows may grow to (prompt and completion)."""
        return len(self.prompt.ids) + self.sampling.max_tokens


class ChatEngine:
    kind = "transformers"  # the engine's name, shown per model in /health

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
        # the last prefill's cache: merged into ``_state`` once its first tokens are out
        self._joining: Batch | None = None
        self._logits: torch.Tensor | None = None  # the running rows' next-token logits
        self._generators: dict[torch.device, torch.Generator] = {}  # unseeded draws'
        self._cap = self.limits.max_running
        self._cap_until = 0.0
        self._gone_due = Throttle()  # running jobs' callers: every GONE_EVERY_S
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
        """Stop the scheduler. No caller is left waiting: the queued jobs fail now, the
        running ones once the scheduler is out of its step (``ServiceUnavailable``)."""
        with self._cond:
            self._stopped = True
            waiting = self._take_waiting()
            self._cond.notify()
        _fail(waiting, self._stopped_error())
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
        with self._cond:
            stopped = self._stopped
            if jobs and not stopped:
                (self._batch if lane == BATCH else self._live).extend(jobs)
                self._cond.notify()
        if stopped:  # nothing would ever run them
            _fail(jobs, self._stopped_error())
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
        return job

    def _generator(self, job: ChatJob, device: torch.device) -> torch.Generator:
        """The generator ``job``'s sampled rows draw with, on ``device`` (the logits'):
        a CPU generator cannot drive a draw on CUDA. A seeded request has its own,
        seeded once, so what it draws depends on nothing else in the batch and repeats
        from run to run; the others share the engine's, seeded at random."""
        if job.sampling.seed is None:
            shared = self._generators.get(device)
            if shared is None:
                shared = self._generators[device] = torch.Generator(device=device)
                shared.seed()
            return shared
        if job.generator is None:
            job.generator = torch.Generator(device=device)
            job.generator.manual_seed(int(job.sampling.seed))
        return job.generator

    # -- the scheduler ------------------------------------------------------------------

    def _loop(self) -> None:
        """The scheduler thread (see the module docstring). A step that raises fails
        what it held and the loop goes on; once stopped, what is left fails."""
        while True:
            admitted: list[ChatJob] = []
            try:
                with self._cond:
                    while not self._stopped and not self._running and not self._waiting():
                        self._cond.wait()
                    if self._stopped:
                        break
                    admitted, preempt = self._admit()
                if preempt:
                    self._preempt(preempt)
                if admitted:
                    self._prefill(admitted)
                if self._running:
                    self._step()
            except Exception as exc:  # a bug or a broken forward: fail what runs, go on
                log.exception("chat step failed for %s", self.entry.id)
                self._fail_running(exc)
                _fail(self._orphans(admitted), exc)
        with self._cond:
            waiting = self._take_waiting()
        error = self._stopped_error()
        _fail(waiting, error)
        self._fail_running(error)

    def _waiting(self) -> bool:
        return bool(self._live or self._batch)

    def _take_waiting(self) -> list[ChatJob]:
        """Every queued job, the queues emptied; holds the lock."""
        waiting = [*self._live, *self._batch]
        self._live.clear()
        self._batch.clear()
        return waiting

    def _orphans(self, admitted: list[ChatJob]) -> list[ChatJob]:
        """Of the jobs admitted this turn, those that are neither running nor queued
        again: after a failed step nothing else would ever complete them."""
        running = {c.job for c in self._running}
        with self._cond:
            queued = {*self._live, *self._batch}
        return [j for j in admitted if j not in running and j not in queued]

    def _stopped_error(self) -> ServiceUnavailable:
        return ServiceUnavailable(f"model {self.entry.id!r} stopped before it answered")

    def _admit(self) -> tuple[list[ChatJob], list[ChatJob]]:
        """(jobs to start now, running batch jobs to preempt for them); holds the lock.
        Live first; batch only when no live job waits. A live job that finds no room
        preempts running batch jobs, newest first, when that makes it fit: they go back
        to wait and resume later by prefilling what they had generated, so a live
        request never waits for a batch sequence to finish. When even preempting every
        batch job would not make room, nothing is preempted: the live job waits for
        running live ones, and the batch jobs go on meanwhile."""
        if self._cap_until and time.monotonic() > self._cap_until:
            self._cap, self._cap_until = self.limits.max_running, 0.0
        held = list({c.job: None for c in self._running})  # running, then admitted
        preempt: list[ChatJob] = []
        taken: list[ChatJob] = []
        for queue in (self._live, self._batch):
            if queue is self._batch and (self._live or taken):
                break  # live jobs wait for room, or prefill alone: no batch job delays them
            prefill = 0  # prompt tokens of the batch jobs taken
            while queue:
                job = queue[0]
                if job.future.done():  # dropped or cancelled while it waited
                    queue.popleft()
                    continue
                if queue is self._batch:
                    prefill += job.prefill_tokens
                    if prefill > self.limits.batch_prefill_tokens and taken:
                        break  # the rest start after the next decode step
                if not self._fits(held, job):
                    victims = self._victims(held, job) if queue is self._live else []
                    if not victims:
                        break
                    preempt.extend(victims)
                    held = [j for j in held if j not in victims]
                queue.popleft()
                taken.append(job)
                held.append(job)
        return taken, preempt

    def _fits(self, held: list[ChatJob], job: ChatJob) -> bool:
        """Whether ``job`` can run beside ``held``: within the running cap, and the cache
        they may grow to within the token budget. The cache is left-padded, so it costs
        every row the widest row's columns (prompt plus ``max_tokens``), not the sum of
        the rows' own. Batch work leaves ``live_reserve`` rows free, so a live request
        that arrives finds a row without preempting (a preempted job prefills again
        what it had generated). Alone, a job runs whatever its size."""
        if not held:
            return True
        rows = job.sampling.n + sum(j.sampling.n for j in held)
        widest = max(job.width, *(j.width for j in held))
        cap = self._cap if job.lane == LIVE else max(1, self._cap - self.limits.live_reserve)
        return rows <= cap and rows * widest <= self.token_budget

    def _victims(self, held: list[ChatJob], job: ChatJob) -> list[ChatJob]:
        """The running batch jobs, newest first, whose preemption makes room for the
        live ``job``: as few as will do, or none when even all of them would not
        (preempting them then would only throw their work away). While live jobs are
        admitted no batch job is, so every batch job in ``held`` is a running one."""
        victims: list[ChatJob] = []
        kept = list(held)
        for victim in reversed(held):
            if victim.lane != BATCH:
                continue
            victims.append(victim)
            kept.remove(victim)
            if self._fits(kept, job):
                return victims
        return []

    def _preempt(self, jobs: list[ChatJob]) -> list[int]:
        """Take ``jobs`` out of the running batch and put them back first in their queue
        (each resumes later by prefilling what it had generated). The rows kept."""
        assert self._joining is None  # merged by the step that followed its prefill
        gone = set(jobs)
        keep = [i for i, c in enumerate(self._running) if c.job not in gone]
        for choice in self._running:
            if choice.job in gone:
                choice.counts = None  # rebuilt from its tokens when it resumes
        self._state = select(self._state, keep) if keep and self._state is not None else None
        if keep and self._logits is not None:
            self._logits = self._logits[row_index(keep, self._logits.device)]
        else:
            self._logits = None
        self._running = [self._running[i] for i in keep]
        self.preempted += len(jobs)
        self._requeue(jobs)
        return keep

    def _prefill(self, jobs: list[ChatJob]) -> None:
        """Start ``jobs``: their sequences in one forward, merged into the running batch.
        A forward that fails fails exactly these jobs: it built a cache of its own, so
        the running batch is untouched and goes on. Out of memory with several jobs,
        the newer half goes back to wait and the older half tries again."""
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
        except OutOfMemory as exc:
            if len(jobs) == 1:
                _fail(jobs, exc)
                return
            half = len(jobs) // 2
            self._requeue(jobs[half:])
            self._prefill(jobs[:half])
            return
        except Exception as exc:
            log.exception("chat prefill failed for %s", self.entry.id)
            _fail(jobs, exc)
            return
        took = time.perf_counter() - began
        self.stats.record(len(choices), took)
        if tracing.TRACER is not None:  # decode steps are not traced: a span per token
            parents = [job.meta.trace for job in jobs]
            tracing.forward_spans(parents, took, len(choices), model=self.entry.id, name="prefill")
        # running first: a merge that breaks fails them with the batch (``_fail_running``);
        # the merge copies the whole running cache, so it waits until ``_step`` has sent
        # these jobs' first tokens
        self._running.extend(choices)
        assert self._joining is None  # the last turn's step merged it
        self._joining = batch
        self._logits = logits if self._logits is None else torch.cat([self._logits, logits])

    def _step(self) -> None:
        assert self._logits is not None
        tokens, on_device, logprobs = self._sample(self._logits)
        for row, choice in enumerate(self._running):
            self._advance(choice, tokens[row], logprobs[row] if logprobs else None)
        emitted = False
        for job in {c.job: None for c in self._running}:
            emitted |= self._publish(job)
        if emitted:
            time.sleep(0)  # let the reply writer send them before the next forward
        if self._joining is not None:  # the new rows' cache, after their first tokens
            self._state, self._joining = merge(self._state, self._joining), None
        assert self._state is not None
        self._drop_gone([c.job for c in self._running])
        keep = [i for i, c in enumerate(self._running) if c.finish_reason is None]
        for choice in self._running:
            if choice.finish_reason is not None:
                choice.counts = None
        if not keep:
            self._running, self._state, self._logits = [], None, None
            return
        if len(keep) < len(self._running):
            self._state = select(self._state, keep)
            self._running = [self._running[i] for i in keep]
            on_device = on_device[row_index(keep, on_device.device)]
        self._decode(on_device)

    def _decode(self, tokens: torch.Tensor) -> None:
        """One decode step. Out of memory: the cache goes back to its width before the
        step (``rollback``: layers that ran before the failure had appended their
        column), the newest half of the running jobs goes back to wait (``_preempt``),
        and the running batch stays at most the other half for the cooldown; a single
        request that does not fit alone fails."""
        assert self._state is not None
        while True:
            width = int(self._state.mask.shape[1])
            try:
                began = time.perf_counter()
                self._logits = self.backend.decode(self._state, tokens)
                self.stats.record(len(self._running), time.perf_counter() - began)
                return
            except OutOfMemory:
                jobs = list({c.job: None for c in self._running})
                if len(jobs) == 1:
                    raise
                rollback(self._state, width)
                self._logits = None  # the last step's, already sampled
                keep = self._preempt(jobs[len(jobs) // 2 :])
                self._cap = len(keep)
                self._cap_until = time.monotonic() + self.cooldown_s
                log.warning(
                    "out of memory on %s: running batch capped at %d", self.entry.id, self._cap
                )
                assert self._state is not None
                tokens = tokens[row_index(keep, tokens.device)]

    def _requeue(self, jobs: list[ChatJob]) -> None:
        with self._cond:
            for job in reversed(jobs):
                (self._batch if job.lane == BATCH else self._live).appendleft(job)

    # -- tokens -------------------------------------------------------------------------

    def _sample(
        self, logits: torch.Tensor
    ) -> tuple[list[int], torch.Tensor, list[dict[str, Any] | None] | None]:
        """One token per running row, picked on the logits' device (``pick``) and read
        back in one copy: (the tokens, the same on the device for the decode, each row's
        log-probabilities when any row asks, else None)."""
        rows = self._running
        picked = pick(logits, rows, self._generator)
        host, chosen, values, ids = to_host(
            picked.tokens, picked.chosen, picked.top_values, picked.top_ids
        )
        tokens = [int(t) for t in host]
        if not picked.want:
            return tokens, picked.tokens, None
        k = 0 if picked.top_values is None else int(picked.top_values.shape[1])
        entries: list[dict[str, Any] | None] = [None] * len(rows)
        for j, row in enumerate(picked.want):
            top = [
                TokenLogprob(self.backend.token_text(int(ids[j * k + t])), values[j * k + t])
                for t in range(min(rows[row].job.sampling.top_logprobs, k))
            ]
            token = TokenLogprob(self.backend.token_text(tokens[row]), chosen[j])
            entries[row] = logprob_entry(token, top)
        return tokens, picked.tokens, entries

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
            _settle(
                job.future,
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
                ),
            )
            sent = True
        return sent

    # -- callers that went away -----------------------------------------------------------

    def _drop_gone(self, jobs: list[ChatJob], *, force: bool = False) -> list[ChatJob]:
        """``jobs`` less those to drop (``departed``: caller hung up, deadline passed
        before their first token, future done outside), failed with ``Dropped``; their
        sequences finish now, so the next step frees their rows. Running jobs are looked
        at every ``GONE_EVERY_S``; admitted ones (``force``) before their prefill."""
        if not self._gone_due.due(force=force):
            return jobs
        dead = departed(jobs, self.gone)
        for job, error in dead.items():
            for c in job.choices:
                c.finish_reason = c.finish_reason or "stop"
            _settle(job.future, error)
        return [j for j in jobs if j not in dead] if dead else jobs

    def _fail_running(self, exc: BaseException) -> None:
        """Fail every running job and empty the batch (its cache may be half updated)."""
        _fail({c.job: None for c in self._running}, exc)
        self._running, self._state, self._logits, self._joining = [], None, None, None


def _fail(jobs: Iterable[ChatJob], exc: BaseException) -> None:
    """Complete every job in ``jobs`` that is not complete yet with ``exc``."""
    for job in jobs:
        _settle(job.future, exc)


def _settle(future: Future[ChatResult], outcome: ChatResult | BaseException) -> None:
    """Complete ``future`` unless it already is: a caller may cancel it at any moment,
    and completing a cancelled future raises, which must not fail the whole batch."""
    if future.done():
        return
    try:
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
    except InvalidStateError:
        pass  # cancelled in between


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
