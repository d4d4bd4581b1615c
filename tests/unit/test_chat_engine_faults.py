"""workers.chat_engine.ChatEngine when things fail: an out-of-memory or an error raised
from inside a layer's cache update (after the layers before it appended their column),
in a prefill or a decode, and ``stop`` with requests still waiting. Every future must
complete, and what was not hit must go on with the same output as an unfailed run."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from tasks.errors import ServiceUnavailable
from tests.unit.test_chat_engine import FakeChat, engines_on, work
from workers.backends.chat import Batch, OutOfMemory, TransformersChatBackend, rollback
from workers.chat_engine import ChatEngine, Submission

pytestmark = pytest.mark.timeout(30)

LAYERS = 3


@dataclass
class Fault:
    """Raise ``error()`` from the update of cache layer ``layer`` in a ``phase`` forward
    over more than ``over_rows`` rows, at most ``times`` times; ``after``: once that
    layer has appended its own column too (else before it does)."""

    phase: str
    layer: int
    error: Callable[[], Exception]
    over_rows: int = 0
    after: bool = False
    times: int = 1_000_000
    fired: int = 0

    def hits(self, phase: str, layer: int, rows: int) -> bool:
        hit = (phase, layer) == (self.phase, self.layer) and rows > self.over_rows
        if hit and self.fired < self.times:
            self.fired += 1
            return True
        return False


class FlakyLayer(DynamicLayer):
    """A cache layer whose update may fail part way through a forward, as a device out
    of memory inside one of a model's layers does."""

    def __init__(self, backend: LayeredChat, index: int) -> None:
        super().__init__()
        self.backend, self.index = backend, index

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        fault = self.backend.fault
        rows = int(key_states.shape[0])
        if fault is None or not fault.hits(self.backend.phase, self.index, rows):
            return super().update(key_states, value_states, *args, **kwargs)
        if fault.after:
            super().update(key_states, value_states, *args, **kwargs)
        raise fault.error()


class LayeredChat(FakeChat):
    """FakeChat with LAYERS cache layers, each updated in turn as a model's forward does.
    Each decode first checks that every layer is as wide as the mask: a cache left out
    of step by a failed forward fails the decode (and is recorded in ``misaligned``)."""

    def __init__(self, tmp: Path, **defaults: Any) -> None:
        super().__init__(tmp, **defaults)
        self.fault: Fault | None = None
        self.phase = ""
        self.misaligned: list[tuple[int, ...]] = []

    def _new_cache(self) -> DynamicCache:
        cache = DynamicCache()
        cache.layers.extend(FlakyLayer(self, i) for i in range(LAYERS))
        return cache

    def _append(self, cache: DynamicCache, keys: torch.Tensor, phase: str) -> None:
        self.phase = phase
        for i in range(LAYERS):
            cache.update(keys, keys.clone(), i)

    def decode(self, batch: Batch, tokens: torch.Tensor) -> torch.Tensor:
        widths = tuple(int(layer.keys.shape[2]) for layer in batch.cache.layers)  # type: ignore[union-attr]
        if set(widths) != {batch.mask.shape[1]}:
            self.misaligned.append((int(batch.mask.shape[1]), *widths))
            raise RuntimeError(f"cache {widths} out of step with its mask {batch.mask.shape}")
        return super().decode(batch, tokens)


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., tuple[ChatEngine, LayeredChat]]]:
    yield from engines_on(tmp_path, LayeredChat)


def text_of(engine: ChatEngine, text: str, max_tokens: int) -> str:
    return str(engine.submit(work(text, max_tokens)).result(10).choices[0]["text"])


def test_rollback_cuts_the_mask_and_every_layer_to_the_width_before_the_step() -> None:
    cache = DynamicCache()
    for i, width in enumerate([6, 6, 5]):  # layers 0 and 1 appended, 2 did not
        states = torch.arange(2.0 * width).view(2, 1, width, 1)
        cache.update(states, states + 1, i)
    batch = Batch(cache, torch.ones((2, 6), dtype=torch.long), torch.zeros(2))
    rollback(batch, 5)
    assert batch.mask.shape == (2, 5)
    for layer in cache.layers:
        assert layer.keys is not None and layer.values is not None
        assert layer.keys.shape[2] == layer.values.shape[2] == 5
    assert cache.layers[0].keys.tolist() == torch.arange(12.0).view(2, 1, 6, 1)[:, :, :5].tolist()  # type: ignore[union-attr]


def test_a_failed_decode_forward_leaves_the_mask_as_it_was(tmp_path: Path) -> None:
    """The transformers backend appends the mask column only once the forward succeeded
    (``ChatBackend.decode``): a failed one leaves it for ``rollback``'s width."""
    fake = FakeChat(tmp_path)
    backend = TransformersChatBackend(fake.entry, device="cpu", model_path="/")

    def out_of_memory(**inputs: Any) -> Any:
        raise OutOfMemory("simulated")

    backend._forward = out_of_memory  # type: ignore[method-assign]
    mask = torch.ones((2, 4), dtype=torch.long)
    batch = Batch(DynamicCache(), mask, torch.zeros(2, dtype=torch.long))
    with pytest.raises(OutOfMemory):
        backend.decode(batch, torch.tensor([3, 4]))
    assert batch.mask is mask


@pytest.mark.parametrize("after", [False, True], ids=["before-its-append", "after-its-append"])
def test_out_of_memory_inside_a_layer_update_rolls_every_layer_back(make: Any, after: bool) -> None:
    """Six requests decode together; layer 1's update runs out of memory (layer 0 has
    appended its column, and with ``after`` layer 1 too). The rollback cuts every layer
    back to the mask: the next decodes find them aligned, and every request ends with
    the output of an unfailed run."""
    engine, backend = make(max_running=8)
    texts = [f"request {i} " * (i + 1) for i in range(6)]
    expected = [text_of(engine, t, 12) for t in texts]
    backend.fault = Fault("decode", 1, lambda: OutOfMemory("simulated"), over_rows=3, after=after)
    futures = engine.submit_many([Submission(work(t, 12)) for t in texts])
    assert [f.result(10).choices[0]["text"] for f in futures] == expected
    assert backend.fault.fired >= 1 and backend.misaligned == []
    assert engine.preempted >= 3 and engine._cap <= 3


@pytest.mark.parametrize(
    "error",
    [RuntimeError("broken layer"), OutOfMemory("simulated")],
    ids=["error", "out-of-memory"],
)
def test_a_failed_prefill_fails_its_own_jobs_and_the_batch_goes_on(
    make: Any, error: Exception
) -> None:
    """A job runs; two more arrive together and their prefill fails inside layer 1's
    update. Their futures get the error at once (out of memory: after halving, each
    alone), the running job neither fails nor changes its output."""
    engine, backend = make(max_running=8)
    expected = text_of(engine, "running job", 100)
    backend.delay_s = 0.005  # the running job takes 0.5 s at least
    steps = len(backend.decodes)
    running = engine.submit(work("running job", 100))
    while len(backend.decodes) < steps + 3:  # it is running
        time.sleep(0.005)
    backend.fault = Fault("prefill", 1, lambda: error)
    doomed = engine.submit_many([Submission(work("doomed one", 5)), Submission(work("two", 5))])
    for future in doomed:
        with pytest.raises(type(error)):
            future.result(timeout=5)
    assert not running.done()
    backend.fault = None
    assert running.result(10).choices[0]["text"] == expected
    assert len(text_of(engine, "after it", 3).split()) == 3


def test_a_failed_decode_fails_the_running_jobs_and_leaves_none_waiting(make: Any) -> None:
    """Two jobs run (max_running 2), two wait; a decode fails (not out of memory) inside
    the last layer: the running two fail, the waiting two run after and succeed."""
    engine, backend = make(max_running=2)
    texts = [f"job {i}" for i in range(4)]
    expected = [text_of(engine, t, 6) for t in texts]
    backend.fault = Fault(
        "decode", LAYERS - 1, lambda: RuntimeError("broken"), over_rows=1, times=1
    )
    futures = engine.submit_many([Submission(work(t, 6)) for t in texts])
    for future in futures[:2]:
        with pytest.raises(RuntimeError, match="broken"):
            future.result(timeout=5)
    assert [f.result(10).choices[0]["text"] for f in futures[2:]] == expected[2:]


def test_stop_completes_every_pending_future(make: Any) -> None:
    """Stopped with one job in a decode and three queued: the queued fail at once, the
    running one once its step is over, and a request submitted after fails too."""
    engine, backend = make(max_running=1)
    backend.gate.clear()  # the running job's first decode waits
    running = engine.submit(work("running", 50))
    while not backend.prefills:
        time.sleep(0.005)
    queued = [engine.submit(work(f"queued {i}", 5)) for i in range(3)]
    stopper = threading.Thread(target=engine.stop)
    stopper.start()
    for future in queued:
        with pytest.raises(ServiceUnavailable):
            future.result(timeout=2)
    backend.gate.set()
    with pytest.raises(ServiceUnavailable):
        running.result(timeout=5)
    stopper.join(5)
    with pytest.raises(ServiceUnavailable):
        engine.submit(work("late", 3)).result(timeout=1)
