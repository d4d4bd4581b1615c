"""Token sampling for every running row of a chat batch at once, on the logits' device.

``pick`` takes a step's next-token logits (rows, vocab) and gives one token per row:
OpenAI's presence and frequency penalties over each row's generated tokens, greedy at
temperature 0, else a draw at the row's temperature from its top-p set (with a seeded
request's own generator), and the raw log-probabilities (chosen and top ones) of the
rows that ask. Each stage is one batched op for all the rows, and ``to_host`` reads the
results back in one device-to-host copy per step.

Why here and so: every tensor is made on the logits' device and no value is read back
until ``to_host``, so sampling is device-correct by construction (no CPU tensor or CPU
generator meets CUDA logits) and a step waits for the device once, not once per row.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch


@dataclass(frozen=True)
class Sampling:
    """A request's sampling parameters (from its ``work``)."""

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


class Job(Protocol):
    """What sampling reads of a request (``workers.chat_engine.ChatJob``)."""

    @property
    def sampling(self) -> Sampling: ...


JobT_co = TypeVar("JobT_co", bound=Job, covariant=True)
JobT = TypeVar("JobT", bound=Job)


class Row(Protocol[JobT_co]):
    """A running sequence, one row of the logits (``workers.chat_engine.Choice``)."""

    @property
    def job(self) -> JobT_co: ...

    generated: list[int]
    # how often each token was generated (vocab,), on the logits' device, for penalties;
    # built on the first penalised step (again after a preemption), see ``_penalise``
    counts: torch.Tensor | None


# the generator a sampled row of this job draws with, on this device (None: the default)
GeneratorFor = Callable[[JobT, torch.device], torch.Generator | None]


# Everything below ``pick`` runs on the logits' device and reads nothing back: every
# tensor it makes is made there (host values go over as one small copy each, with
# ``non_blocking``, which does not wait for the device), and no Python value is taken
# from a device tensor, so a step waits for the device once, in ``to_host``.


@dataclass
class Picked:
    """A step's tokens, on the logits' device, and the log-probabilities of the rows
    that asked (``want``): the chosen token's, and the top ``k`` (values and ids)."""

    tokens: torch.Tensor  # (rows,)
    want: list[int]
    chosen: torch.Tensor | None = None  # (len(want),)
    top_values: torch.Tensor | None = None  # (len(want), k)
    top_ids: torch.Tensor | None = None


@dataclass
class _Penalties:
    rows: list[int]
    index: torch.Tensor  # ``rows`` on the device
    counts: torch.Tensor  # (len(rows), vocab)


def pick(logits: torch.Tensor, rows: Sequence[Row[JobT]], generator: GeneratorFor[JobT]) -> Picked:
    """One token per row of ``logits`` (rows, vocab): greedy at temperature 0, else
    drawn (``_draw``), after OpenAI's penalties (``_penalise``); and the raw
    (unpenalised) log-probabilities of the rows that ask. Batched: one op per stage for
    all the rows, not one per row."""
    device = logits.device
    scores, penalties = _penalise(logits, rows)
    tokens = scores.argmax(dim=-1)
    hot = [i for i, c in enumerate(rows) if c.job.sampling.temperature > 0]
    if hot:
        order, drawn = _draw(scores, rows, hot, generator)
        tokens = tokens.index_put((row_index(order, device),), drawn)
    if penalties is not None:
        _count(rows, penalties, tokens)
    return _logprobs(logits, tokens, [c.job.sampling for c in rows])


def _penalise(
    logits: torch.Tensor, rows: Sequence[Row[Job]]
) -> tuple[torch.Tensor, _Penalties | None]:
    """The logits less OpenAI's penalties over each row's generated tokens (frequency x
    count + presence x (count > 0)), for every penalised row in one op. The counts are
    each choice's own, on the device: built from its tokens at its first penalised
    step (or when it resumes), then kept up to date by ``_count``."""
    penalised = [
        i
        for i, c in enumerate(rows)
        if c.job.sampling.presence_penalty or c.job.sampling.frequency_penalty
    ]
    if not penalised:
        return logits, None
    device, dtype = logits.device, logits.dtype
    held: list[torch.Tensor] = []
    for i in penalised:
        counts = rows[i].counts
        if counts is None:
            counts = rows[i].counts = _counts(rows[i].generated, logits.shape[1], device, dtype)
        held.append(counts)
    counts = torch.stack(held)
    coef = _on(
        [
            [rows[i].job.sampling.frequency_penalty, rows[i].job.sampling.presence_penalty]
            for i in penalised
        ],
        device,
        dtype,
    )
    penalty = counts * coef[:, :1] + (counts > 0).to(dtype) * coef[:, 1:]
    index = row_index(penalised, device)
    scores = logits.index_put((index,), logits[index] - penalty)
    return scores, _Penalties(penalised, index, counts)


def _counts(
    generated: list[int], vocab: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """How often each token is in ``generated``: (vocab,) on ``device``."""
    counts = torch.zeros(vocab, dtype=dtype, device=device)
    if generated:
        ids = row_index(generated, device)
        counts.index_add_(0, ids, torch.ones(len(generated), dtype=dtype, device=device))
    return counts


def _count(rows: Sequence[Row[Job]], penalties: _Penalties, tokens: torch.Tensor) -> None:
    """The penalised rows' counts with the tokens just picked (one op); each choice
    keeps its row of them (a view) for its next step."""
    counts = penalties.counts
    at = torch.arange(len(penalties.rows), device=counts.device)
    counts[at, tokens[penalties.index]] += 1
    for i, row in zip(penalties.rows, counts.unbind(0), strict=True):
        rows[i].counts = row


def _draw(
    scores: torch.Tensor,
    rows: Sequence[Row[JobT]],
    hot: list[int],
    generator: GeneratorFor[JobT],
) -> tuple[list[int], torch.Tensor]:
    """A token for each of the ``hot`` rows (temperature > 0), drawn at its temperature
    from the smallest set of mass ``top_p``: (the rows in the order drawn, the tokens).
    Rows are grouped by generator and each group drawn in one call: a seeded request's
    rows are a group of their own, so its draws depend only on its own rows and seed,
    whatever else runs beside it; the unseeded share one generator and one call."""
    device = scores.device
    groups: dict[int, tuple[torch.Generator | None, list[int]]] = {}
    for i in hot:
        gen = generator(rows[i].job, device)
        groups.setdefault(id(gen), (gen, []))[1].append(i)
    order = [i for _, members in groups.values() for i in members]
    settings = [rows[i].job.sampling for i in order]
    params = _on(
        [[s.temperature, s.top_p if s.top_p < 1.0 else math.inf] for s in settings],
        device,
        scores.dtype,
    )
    probs = torch.softmax(scores[row_index(order, device)] / params[:, :1], dim=-1)
    if any(s.top_p < 1.0 for s in settings):
        probs = _top_p(probs, params[:, 1:])
    drawn: list[torch.Tensor] = []
    at = 0
    for gen, members in groups.values():
        part = probs[at : at + len(members)]
        drawn.append(torch.multinomial(part, 1, generator=gen).squeeze(1))
        at += len(members)
    return order, torch.cat(drawn)


def _top_p(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """``probs`` (rows, vocab) with each row's tokens outside the smallest set of mass
    ``top_p`` (rows, 1) zeroed (not renormalised: ``multinomial`` does not need it). A
    row whose ``top_p`` is infinite keeps every token."""
    ordered, order = torch.sort(probs, dim=-1, descending=True)
    outside = ordered.cumsum(dim=-1) - ordered > top_p
    return torch.zeros_like(probs).scatter_(-1, order, ordered.masked_fill(outside, 0.0))


def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, settings: list[Sampling]) -> Picked:
    """``tokens`` with the log-probabilities of the rows that ask: of the raw logits
    (before penalties), the chosen token's and the top ones, in one ``topk`` for all."""
    want = [i for i, s in enumerate(settings) if s.logprobs]
    if not want:
        return Picked(tokens, want)
    index = row_index(want, logits.device)
    raw = torch.log_softmax(logits[index], dim=-1)
    chosen = raw.gather(1, tokens[index].unsqueeze(1)).squeeze(1)
    k = min(max(settings[i].top_logprobs for i in want), int(raw.shape[1]))
    if not k:
        return Picked(tokens, want, chosen)
    values, ids = torch.topk(raw, k, dim=-1)
    return Picked(tokens, want, chosen, values, ids)


def _on(values: list[Any], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Host values as a tensor on ``device``: one copy, that does not wait for the
    device (``non_blocking`` from pageable memory stages the copy first)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def row_index(rows: list[int], device: torch.device) -> torch.Tensor:
    """Row numbers as an index tensor on ``device``."""
    return _on(rows, device, torch.long)


def to_host(*tensors: torch.Tensor | None) -> list[list[float]]:
    """The values of ``tensors`` (each flattened; None: empty) in one device-to-host
    copy: each copy waits for the device, so a step reads back once. float64 holds the
    token ids and float32 log-probabilities exactly."""
    present = [t.reshape(-1).to(torch.float64) for t in tensors if t is not None]
    flat: list[float] = torch.cat(present).tolist() if present else []
    out: list[list[float]] = []
    at = 0
    for t in tensors:
        size = 0 if t is None else t.numel()
        out.append(flat[at : at + size])
        at += size
    return out
