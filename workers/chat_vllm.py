"""One chat model on vLLM's engine, under laneway's lanes.

vLLM (``AsyncLLM``) does the scheduling, paged KV cache, prefix cache and kernels; laneway
keeps what vLLM's own server lacks: a live lane ahead of a batch lane, and Batch API work
that survives preemption. vLLM's ``priority`` policy orders its waiting queue but does
not evict a running request when every sequence slot is full (vLLM issue 40004), so:

- each choice of a request is one vLLM request (``n`` choices: ``n`` requests, seeds
  ``seed + index`` as vLLM's own parallel sampling gives them), so one slot is one
  sequence and a preempted choice resumes alone;
- live sequences are submitted at once, at priority 0;
- batch sequences wait here and hold at most ``max_running - live_reserve`` slots (and
  never a slot a live sequence holds), at priority 1;
- when live sequences would find no free slot, the newest running batch sequences are
  aborted and wait again first in line. They resume as prompt + the tokens generated so
  far (vLLM's prefix cache makes that prefill cheap) for the tokens still missing, so a
  greedy output equals an unpreempted run and no token is produced twice.

The engine's event loop runs on a thread of its own; ``submit_many`` renders prompts on
the caller's thread (vLLM's chat renderer with the model's chat template) and hands the
jobs to the loop. A caller that hangs up (the runtime's ``gone`` check) or a deadline
that passes before the first token aborts its sequences in vLLM.

vLLM starts its engine core in a child process with ``spawn``, which re-imports the
parent's main module: laneway's entry points guard ``main()`` with ``__name__``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from configs.catalog import CatalogEntry
from configs.settings import Settings
from tasks.contracts.chat import ChatLimits, check_context
from tasks.contracts.chat_bodies import TokenLogprob, logprob_entry
from tasks.errors import InvalidRequest, LanewayError
from tasks.queue.names import BATCH, LIVE, Lane
from workers.chat_engine import ChatResult, Emit, Sampling, Submission
from workers.jobs import GONE_EVERY_S, ForwardStats, GoneCheck, JobMeta, departed, failed

log = logging.getLogger(__name__)

T = TypeVar("T")
START_TIMEOUT_S = 900  # loading weights and profiling memory may take minutes on a GPU
LIVE_PRIORITY, BATCH_PRIORITY = 0, 1  # vLLM runs the lower number first


def available() -> str | None:
    """Why vLLM cannot serve here, or None when it can (imported, not only installed)."""
    try:
        import vllm  # noqa: F401
        from vllm.v1.engine.async_llm import AsyncLLM  # noqa: F401
    except Exception as exc:  # ImportError, or a wheel built for another torch
        return f"{type(exc).__name__}: {exc}"
    return None


@dataclass(eq=False)
class _Seq:
    """One choice of a job: one vLLM request at a time (a new one after preemption)."""

    job: _Job
    index: int
    generated: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    resumed: bool = False  # preempted once at least: its text is decoded from its ids
    attempt: int = 0
    task: asyncio.Task[None] | None = None
    preempting: bool = False

    @property
    def request_id(self) -> str:
        return f"{self.job.key}-{self.index}-{self.attempt}"


@dataclass(eq=False)
class _Job:
    key: str
    sampling: Sampling
    prompt: dict[str, Any]  # vLLM's engine input (token ids, multimodal features)
    prompt_ids: list[int]
    lane: Lane
    meta: JobMeta
    emit: Emit | None
    future: Future[ChatResult] = field(default_factory=Future)
    seqs: list[_Seq] = field(default_factory=list)
    arrived: float = field(default_factory=time.monotonic)
    started: bool = False  # its first token came

    images: bool = False

    @property
    def answering(self) -> bool:
        """Whether a token of it has come (``workers.jobs.departed``: its deadline no
        longer applies)."""
        return any(s.generated for s in self.seqs)

    @property
    def resumable(self) -> bool:
        """Whether a preempted sequence of it can resume as prompt + generated with the
        same output: not with images (vLLM's processed inputs are not re-made here), nor
        with presence or frequency penalties (vLLM counts the output alone, and resumed
        tokens would be prompt)."""
        s = self.sampling
        return not self.images and not (s.presence_penalty or s.frequency_penalty)


class VllmChatEngine:
    """``ChatEngine``'s interface (``submit``/``submit_many``/``stop``/``metrics``) on vLLM."""

    kind = "vllm"

    def __init__(
        self,
        entry: CatalogEntry,
        settings: Settings,
        *,
        model_path: str,
        device: str,
        gone: GoneCheck | None = None,
        start: Callable[[], Coroutine[Any, Any, VllmApi]] | None = None,
    ) -> None:
        """``start`` makes the vLLM parts on the engine's loop (default ``start_vllm``;
        unit tests pass a fake)."""
        self.entry = entry
        self.limits = ChatLimits.from_entry(entry)
        self.max_seqs = self.limits.max_running
        self.batch_slots = max(1, self.max_seqs - self.limits.live_reserve)
        self.gone = gone
        self.stats = ForwardStats()  # queue waits (to the first token); vLLM does the forwards
        self.tokens_out = 0
        self.preempted = 0
        self._keys = itertools.count(1)  # next() is atomic: submitters are several threads
        self._live: set[_Seq] = set()  # submitted to vLLM, not finished
        self._batch: list[_Seq] = []  # submitted to vLLM, in start order
        self._waiting: deque[_Seq] = deque()  # batch sequences for a free slot
        self._stopped = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"vllm-{entry.id}", daemon=True
        )
        self._thread.start()
        try:
            make = start or partial(start_vllm, entry, self.limits, model_path, device)
            self.api = self._call(make(), timeout=START_TIMEOUT_S)
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise
        self._gone_task = self._call(self._spawn_gone_loop())
        self.warm = True

    @classmethod
    def load(
        cls, entry: CatalogEntry, settings: Settings, *, device: str, gone: GoneCheck | None
    ) -> VllmChatEngine:
        path = entry.resolve_path(auto_download=settings.auto_download)
        return cls(entry, settings, model_path=path, device=device, gone=gone)

    # -- the loop thread ------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = 60) -> T:
        """Run ``coro`` on the engine's loop and wait for it (never on the loop itself)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _spawn_gone_loop(self) -> asyncio.Task[None]:
        return asyncio.create_task(self._gone_loop())

    # -- submission -----------------------------------------------------------------------

    def submit(
        self,
        work: dict[str, Any],
        *,
        images: Sequence[bytes] = (),
        lane: Lane = LIVE,
        meta: JobMeta | None = None,
        emit: Emit | None = None,
    ) -> Future[ChatResult]:
        [future] = self.submit_many([Submission(work, images, meta or JobMeta(), emit)], lane=lane)
        return future

    def submit_many(
        self, submissions: Sequence[Submission], *, lane: Lane = LIVE
    ) -> list[Future[ChatResult]]:
        """Render and check each request on this thread; queue them on the loop at once."""
        futures: list[Future[ChatResult]] = []
        jobs: list[_Job] = []
        for sub in submissions:
            try:
                job = self._job(sub, lane)
            except LanewayError as exc:
                futures.append(failed(exc))
                continue
            jobs.append(job)
            futures.append(job.future)
        if jobs:
            try:
                self._loop.call_soon_threadsafe(self._enqueue, jobs)
            except RuntimeError:  # the loop is closed: the engine has stopped
                self._enqueue_stopped(jobs)
        return futures

    @staticmethod
    def _enqueue_stopped(jobs: list[_Job]) -> None:
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(RuntimeError("the engine has stopped"))

    def _job(self, sub: Submission, lane: Lane) -> _Job:
        sampling = Sampling.from_work(sub.work)
        prompt = self._render(sub.work["messages"], sub.images)
        ids = list(prompt["prompt_token_ids"])
        check_context(len(ids), sampling.max_tokens, self.limits.context_length)
        job = _Job(f"lw{next(self._keys)}", sampling, prompt, ids, lane, sub.meta, sub.emit)
        job.images = bool(sub.images)
        job.seqs = [_Seq(job, i) for i in range(sampling.n)]
        return job

    def _render(self, messages: Sequence[dict[str, Any]], images: Sequence[bytes]) -> Any:
        """vLLM's chat rendering (the model's template); images as vLLM's PIL parts."""
        if images and not self.limits.supports_images:
            raise InvalidRequest(f"model {self.entry.id!r} does not accept images")
        conversation = vllm_messages(messages, images)
        try:
            _, [prompt] = self.api.llm.renderer.render_chat(
                [conversation], self.api.chat_params, self.api.tok_params
            )
        except LanewayError:
            raise
        except Exception as exc:  # a template's raise_exception, a context overflow
            raise InvalidRequest(
                f"the messages do not fit model {self.entry.id!r}: {exc}", param="messages"
            ) from None
        return prompt

    # -- on the loop: lanes -----------------------------------------------------------------

    def _enqueue(self, jobs: list[_Job]) -> None:
        if self._stopped:  # submitted while the engine stopped: nothing would run them
            self._enqueue_stopped(jobs)
            return
        for job in jobs:
            if job.lane == BATCH:
                self._waiting.extend(job.seqs)
            else:
                for seq in job.seqs:
                    self._launch(seq)
        self._make_room()
        self._admit_batch()

    def _admit_batch(self) -> None:
        """Batch sequences into free slots: at most ``batch_slots``, never one a live
        sequence holds."""
        while self._waiting and not self._stopped:
            room = min(self.batch_slots, self.max_seqs - len(self._live))
            if len(self._batch) >= room:
                return
            seq = self._waiting.popleft()
            if seq.job.future.done():
                continue
            self._launch(seq)

    def _make_room(self) -> None:
        """Abort the newest batch sequences while the live ones would find no free slot."""
        while len(self._live) + len(self._batch) > self.max_seqs:
            victim = next((s for s in reversed(self._batch) if s.job.resumable), None)
            if victim is None:  # what runs cannot resume unchanged: let it finish
                return
            self._batch.remove(victim)
            victim.preempting = True
            self.preempted += 1
            if victim.task is not None:
                victim.task.cancel()  # vLLM's generate aborts the request on cancel

    def _launch(self, seq: _Seq) -> None:
        (self._batch.append if seq.job.lane == BATCH else self._live.add)(seq)
        seq.task = asyncio.create_task(self._run(seq))

    def _release(self, seq: _Seq) -> None:
        if seq.job.lane == BATCH:
            if seq in self._batch:
                self._batch.remove(seq)
        else:
            self._live.discard(seq)

    # -- on the loop: one sequence ------------------------------------------------------------

    async def _run(self, seq: _Seq) -> None:
        job = seq.job
        try:
            async for out in self.api.llm.generate(
                self._prompt_of(seq),
                self._params(seq),
                seq.request_id,
                priority=BATCH_PRIORITY if job.lane == BATCH else LIVE_PRIORITY,
            ):
                self._take(seq, out.outputs[0])
        except asyncio.CancelledError:
            self._release(seq)
            if seq.preempting and not job.future.done():
                seq.preempting, seq.resumed = False, True
                seq.attempt += 1
                self._waiting.appendleft(seq)  # first in line for the next free slot
            self._admit_batch()
            return
        except Exception as exc:
            self._release(seq)
            self._fail(job, exc)
            self._admit_batch()
            return
        self._release(seq)
        self._finish(seq)
        self._admit_batch()

    def _prompt_of(self, seq: _Seq) -> Any:
        """The prompt, or after a preemption the prompt and what was generated so far."""
        if not seq.generated:
            return seq.job.prompt
        ids = seq.job.prompt_ids + seq.generated
        [prompt] = self.api.llm.renderer.render_cmpl([{"prompt_token_ids": ids}])
        return prompt

    def _params(self, seq: _Seq) -> Any:
        s = seq.job.sampling
        return self.api.sampling_params(
            n=1,
            max_tokens=s.max_tokens - len(seq.generated),
            temperature=s.temperature,
            top_p=s.top_p,
            seed=None if s.seed is None else int(s.seed) + seq.index,
            stop=list(s.stop) or None,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            logprobs=s.top_logprobs if s.logprobs else None,
            output_kind=self.api.delta,
            skip_special_tokens=True,
        )

    def _take(self, seq: _Seq, out: Any) -> None:
        """One delta of ``seq``: its tokens, text and log-probabilities; streamed on."""
        if not seq.job.started:
            seq.job.started = True
            self.stats.waited(seq.job.lane, seq.job.meta.sent_at, seq.job.arrived)
        seq.generated.extend(out.token_ids)
        self.tokens_out += len(out.token_ids)
        seq.text += out.text
        fresh: list[dict[str, Any]] = []
        if seq.job.sampling.logprobs and out.logprobs:
            fresh = [
                _logprob(token, entry, seq.job.sampling.top_logprobs)
                for token, entry in zip(out.token_ids, out.logprobs, strict=False)
            ]
            seq.logprobs.extend(fresh)
        if out.finish_reason is not None:
            seq.finish_reason = "length" if out.finish_reason == "length" else "stop"
        if seq.job.emit is not None and (out.text or fresh or seq.finish_reason):
            delta: dict[str, Any] = {"index": seq.index, "text": out.text}
            if fresh:
                delta["logprobs"] = fresh
            if seq.finish_reason is not None:
                delta["finish_reason"] = seq.finish_reason
            seq.job.emit([delta])

    def _finish(self, seq: _Seq) -> None:
        job = seq.job
        if seq.finish_reason is None:  # the stream ended without saying why
            seq.finish_reason = "stop"
        if seq.resumed:  # pieces of text from several requests: decode the whole
            seq.text = _cut_at_stop(
                self._continuation(job.prompt_ids, seq.generated), job.sampling.stop
            )
        if job.future.done() or any(s.finish_reason is None for s in job.seqs):
            return
        job.future.set_result(
            ChatResult(
                [
                    {
                        "index": s.index,
                        "text": s.text,
                        "finish_reason": s.finish_reason,
                        "logprobs": s.logprobs if job.sampling.logprobs else None,
                    }
                    for s in job.seqs
                ],
                prompt_tokens=len(job.prompt_ids),
                completion_tokens=sum(len(s.generated) for s in job.seqs),
            )
        )

    def _continuation(self, prompt: list[int], generated: list[int]) -> str:
        """``generated`` as text after ``prompt``, as vLLM's incremental detokenizer
        writes it (a word-piece's leading space depends on what came before)."""
        head = self.api.tokenizer.decode(prompt, skip_special_tokens=True)
        full = self.api.tokenizer.decode(prompt + generated, skip_special_tokens=True)
        if full.startswith(head):
            return str(full[len(head) :])
        return str(self.api.tokenizer.decode(generated, skip_special_tokens=True))

    def _fail(self, job: _Job, exc: BaseException) -> None:
        """``job`` fails; its other sequences are aborted."""
        if not job.future.done():
            job.future.set_exception(exc)
        for seq in job.seqs:
            if seq.task is not None and not seq.task.done():
                seq.task.cancel()

    # -- on the loop: callers that went away --------------------------------------------------

    async def _gone_loop(self) -> None:
        while not self._stopped:
            await asyncio.sleep(GONE_EVERY_S)
            try:
                await self._drop_gone()
            except Exception:
                log.exception("could not check for departed callers")

    async def _drop_gone(self) -> None:
        """Fail and abort the jobs to drop (``departed``): caller hung up, deadline passed
        before their first token, or future failed from outside (a chunk's timeout). The
        check runs on a thread of the executor: the look-up waits on Redis."""
        jobs = list({s.job: None for s in (*self._live, *self._batch, *self._waiting)})
        if not jobs:
            return
        dead = await asyncio.get_running_loop().run_in_executor(None, departed, jobs, self.gone)
        for job, error in dead.items():
            self._fail(job, error)

    # -- life cycle ---------------------------------------------------------------------------

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True

        async def close() -> None:
            self._gone_task.cancel()
            for seq in [*self._live, *self._batch, *self._waiting]:
                self._fail(seq.job, RuntimeError("the engine has stopped"))
            self.api.llm.shutdown()

        try:
            self._call(close(), timeout=30)
        except Exception:
            log.exception("vLLM engine for %s did not shut down cleanly", self.entry.id)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()  # later submissions fail at once (``submit_many``)

    def metrics(self) -> dict[str, Any]:
        return {
            **self.stats.snapshot(),
            "completion_tokens": self.tokens_out,
            "preempted": self.preempted,
            "running_live": len(self._live),
            "running_batch": len(self._batch),
            "waiting_batch": len(self._waiting),
        }


@dataclass(frozen=True)
class VllmApi:
    """What the engine uses of vLLM: ``AsyncLLM`` (``generate``, ``renderer``,
    ``shutdown``), ``SamplingParams``, the delta output kind, the chat rendering's
    parameters and the tokenizer (unit tests stand a fake in for all of it)."""

    llm: Any
    sampling_params: Callable[..., Any]
    delta: Any
    chat_params: Any
    tok_params: Any
    tokenizer: Any


async def start_vllm(
    entry: CatalogEntry, limits: ChatLimits, model_path: str, device: str
) -> VllmApi:
    """vLLM's engine for ``entry`` (on the engine's loop: ``AsyncLLM`` binds to it)."""
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.renderers.params import ChatParams
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    # the worker has threads (Celery, heartbeats): a forked engine core could inherit a
    # held lock; spawn is what vLLM picks anyway once CUDA is initialised
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    llm = AsyncLLM.from_engine_args(
        AsyncEngineArgs(**engine_args(entry, limits, model_path, device))
    )
    # no length limit while rendering: ``check_context`` then refuses a prompt over the
    # context with laneway's own 400, naming both numbers
    tok_params = dataclasses.replace(
        llm.renderer.default_chat_tok_params, max_total_tokens=None
    ).with_kwargs(add_special_tokens=False)
    log.info("vLLM engine up for %s on %s", entry.id, device)
    return VllmApi(
        llm=llm,
        sampling_params=SamplingParams,
        delta=RequestOutputKind.DELTA,
        chat_params=ChatParams(
            chat_template_kwargs={"add_generation_prompt": True, "tokenize": False}
        ),
        tok_params=tok_params,
        tokenizer=llm.get_tokenizer(),
    )


def engine_args(
    entry: CatalogEntry, limits: ChatLimits, model_path: str, device: str
) -> dict[str, Any]:
    """vLLM's engine arguments for a catalog entry; ``vllm_args`` in its defaults add to
    or override them (e.g. ``gpu_memory_utilization``, ``quantization``)."""
    args: dict[str, Any] = {
        "model": model_path,
        "served_model_name": entry.id,
        "dtype": entry.dtype if entry.dtype != "auto" else "auto",
        "max_model_len": limits.context_length,
        "max_num_seqs": limits.max_running,
        "scheduling_policy": "priority",
        "enable_prefix_caching": True,
        # the request's parameters alone, as laneway's own engine: no sampling defaults
        # from the model's generation_config.json
        "generation_config": "vllm",
        "disable_log_stats": True,
        "enable_log_requests": False,
    }
    if limits.supports_images:
        args["limit_mm_per_prompt"] = {"image": 16, "video": 0}
    if device.startswith("cuda"):
        args["device"] = "cuda"
    args.update(limits.vllm_args)
    return args


def vllm_messages(
    messages: Sequence[dict[str, Any]], images: Sequence[bytes]
) -> list[dict[str, Any]]:
    """The messages in the OpenAI shape vLLM's renderer reads: each ``{"type": "image"}``
    part (``workers.chat.Images``) as an ``image_pil`` part with its decoded picture, so
    vLLM never fetches anything itself."""
    from workers.backends.chat import _picture

    pictures = iter(images)
    out: list[dict[str, Any]] = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") == "image":
                    parts.append({"type": "image_pil", "image_pil": _picture(next(pictures))})
                else:
                    parts.append(part)
            message = {**message, "content": parts}
        elif content is None:
            message = {**message, "content": ""}
        out.append(message)
    return out


def _logprob(token: int, entry: dict[int, Any], top: int) -> dict[str, Any]:
    """vLLM's log-probabilities of one position (the chosen token and the ``top`` best)."""
    chosen = entry.get(token)
    best = sorted(
        (lp for lp in entry.values() if lp.rank is not None and lp.rank <= top),
        key=lambda lp: lp.rank,
    )
    return logprob_entry(
        TokenLogprob(
            chosen.decoded_token or "" if chosen else "",
            chosen.logprob if chosen else float("-inf"),
        ),
        [TokenLogprob(lp.decoded_token or "", lp.logprob) for lp in best],
    )


def _cut_at_stop(text: str, stops: Sequence[str]) -> str:
    at = min((i for s in stops if (i := text.find(s)) >= 0), default=-1)
    return text if at < 0 else text[:at]
