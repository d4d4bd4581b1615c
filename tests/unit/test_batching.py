"""workers.batching.Batcher over the fake backend: what goes into each forward pass."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np
import pytest

from configs.catalog import load_catalog
from tasks.queue.names import BATCH, LIVE, Lane
from workers.backends.fake import FakeEmbeddingBackend
from workers.batching import Batcher
from workers.jobs import Dropped

pytestmark = pytest.mark.timeout(30)

MakeBatcher = Callable[..., Batcher]


class RecordingBackend(FakeEmbeddingBackend):
    """The fake backend, recording each forward's batch; ``hold`` blocks the next forward
    until released, so tests can queue work while the scheduler is busy."""

    def __init__(self) -> None:
        entry = load_catalog().get("laneway/fake-embeddings")
        super().__init__(entry, device="cpu", model_path="/")
        self.load()
        self.batches: list[list[list[int]]] = []
        self.fail_if: Callable[[list[list[int]]], bool] | None = None
        self._gate = threading.Event()
        self._gate.set()
        self.in_forward = threading.Event()

    def hold(self) -> None:
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def forward(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        self.in_forward.set()
        self._gate.wait(10)
        self.batches.append([list(s) for s in batch])
        if self.fail_if is not None and self.fail_if(self.batches[-1]):
            raise RuntimeError("CUDA out of memory (simulated)")
        return super().forward(batch)


@pytest.fixture
def backend() -> RecordingBackend:
    return RecordingBackend()


@pytest.fixture
def make_batcher(backend: RecordingBackend) -> Iterator[MakeBatcher]:
    made: list[Batcher] = []

    def make(**kw: Any) -> Batcher:
        kw.setdefault("max_batch_size", 64)
        kw.setdefault("token_budget", 100_000)
        b = Batcher(backend, **kw)
        made.append(b)
        return b

    yield make
    for b in made:
        backend.release()
        b.stop()


def seq(length: int, start: int = 2) -> list[int]:
    return [(start + i) % 900 + 2 for i in range(length)]


def block_scheduler(backend: RecordingBackend, batcher: Batcher) -> Future[list[Any]]:
    """Occupy the scheduler with one held forward; returns that job's future."""
    backend.hold()
    first = batcher.submit([seq(3, 500)])
    assert backend.in_forward.wait(5)
    return first


def test_results_equal_unbatched_forward(
    backend: RecordingBackend, make_batcher: MakeBatcher
) -> None:
    batcher = make_batcher()
    seqs = [seq(n, n) for n in (5, 1, 9, 3)]
    out = np.stack(batcher.run(seqs))
    np.testing.assert_allclose(out, FakeEmbeddingBackend.forward(backend, seqs), rtol=1e-6)
    assert out.shape == (4, backend.dimensions)


def test_concurrent_jobs_share_one_forward(
    backend: RecordingBackend, make_batcher: MakeBatcher
) -> None:
    batcher = make_batcher()
    first = block_scheduler(backend, batcher)
    futures = [batcher.submit([seq(4, i)]) for i in range(10)]
    backend.release()
    first.result(5)
    results = [f.result(5) for f in futures]
    assert len(backend.batches) == 2  # the held one, then all ten together
    assert len(backend.batches[1]) == 10
    for i, r in enumerate(results):
        np.testing.assert_allclose(
            r[0], FakeEmbeddingBackend.forward(backend, [seq(4, i)])[0], rtol=1e-6
        )


def test_live_goes_before_batch(backend: RecordingBackend, make_batcher: MakeBatcher) -> None:
    # room for two items per forward: live must win although batch work came first
    batcher = make_batcher(max_batch_size=2)
    block_scheduler(backend, batcher)
    batch_job = batcher.submit([seq(2, 10), seq(2, 20)], lane=BATCH)
    live_job = batcher.submit([seq(6, 30), seq(6, 40)], lane=LIVE)
    backend.release()
    live_job.result(5)
    batch_job.result(5)
    assert backend.batches[1] == [seq(6, 30), seq(6, 40)]
    assert backend.batches[2] == [seq(2, 10), seq(2, 20)]


def test_a_live_forward_carries_no_batch_items(
    backend: RecordingBackend, make_batcher: MakeBatcher
) -> None:
    # room for both, but a live caller must not pay for a batch-sized forward
    batcher = make_batcher()
    block_scheduler(backend, batcher)
    b = batcher.submit([seq(1, 1)], lane=BATCH)
    live = batcher.submit([seq(7, 2)], lane=LIVE)
    backend.release()
    b.result(5)
    live.result(5)
    assert backend.batches[1] == [seq(7, 2)]
    assert backend.batches[2] == [seq(1, 1)]


def test_batch_items_sorted_by_length(backend: RecordingBackend, make_batcher: MakeBatcher) -> None:
    batcher = make_batcher()
    block_scheduler(backend, batcher)
    lengths = [9, 2, 7, 1, 5]
    f1 = batcher.submit([seq(n, n) for n in lengths[:3]], lane=BATCH)
    f2 = batcher.submit([seq(n, n) for n in lengths[3:]], lane=BATCH)
    backend.release()
    out1, out2 = f1.result(5), f2.result(5)
    assert [len(s) for s in backend.batches[1]] == sorted(lengths)
    # sorting must not mix up which vector answers which input
    for n, vec in zip(lengths, [*out1, *out2], strict=True):
        np.testing.assert_allclose(
            vec, FakeEmbeddingBackend.forward(backend, [seq(n, n)])[0], rtol=1e-6
        )


@pytest.mark.parametrize("lane", [LIVE, BATCH])
def test_token_budget_and_max_batch_size(
    backend: RecordingBackend, make_batcher: MakeBatcher, lane: Lane
) -> None:
    # fake max_input_tokens is 128: the budget cannot go below one full-length input
    budget, max_size = 200, 6
    batcher = make_batcher(max_batch_size=max_size, token_budget=budget)
    block_scheduler(backend, batcher)
    rng = np.random.default_rng(1)
    seqs = [seq(int(n), i) for i, n in enumerate(rng.integers(1, 120, size=60))]
    futures = [batcher.submit([s], lane=lane) for s in seqs]
    backend.release()
    for f in futures:
        f.result(10)
    computed = backend.batches[1:]
    assert sum(len(b) for b in computed) == len(seqs)
    for batch in computed:
        assert 1 <= len(batch) <= max_size
        assert len(batch) == 1 or len(batch) * max(len(s) for s in batch) <= budget
    assert any(len(b) > 1 for b in computed)  # it did batch


def test_one_job_larger_than_a_forward_is_split(
    backend: RecordingBackend, make_batcher: MakeBatcher
) -> None:
    batcher = make_batcher(max_batch_size=4)
    out = batcher.run([seq(3, i) for i in range(10)])
    assert len(out) == 10
    assert [len(b) for b in backend.batches] == [4, 4, 2]


def test_gone_jobs_are_dropped_before_compute(
    backend: RecordingBackend, make_batcher: MakeBatcher
) -> None:
    asked: list[list[str]] = []

    def gone(ids: list[str]) -> set[str]:
        asked.append(list(ids))
        return {"left"}

    batcher = make_batcher(gone=gone)
    block_scheduler(backend, batcher)
    left = batcher.submit([seq(5, 77), seq(5, 78)], request_id="left")
    stays = batcher.submit([seq(5, 99)], request_id="stays")
    backend.release()
    with pytest.raises(Dropped):
        left.result(5)
    stays.result(5)
    computed = [s for b in backend.batches for s in b]
    assert seq(5, 77) not in computed and seq(5, 78) not in computed
    assert seq(5, 99) in computed
    assert any("left" in ids for ids in asked)


def test_gone_job_spanning_forwards_is_purged(
    backend: RecordingBackend, make_batcher: MakeBatcher
) -> None:
    batcher = make_batcher(max_batch_size=2, gone=lambda ids: {i for i in ids if i == "x"})
    block_scheduler(backend, batcher)
    job = batcher.submit([seq(2, i) for i in range(6)], request_id="x")
    backend.release()
    with pytest.raises(Dropped):
        job.result(5)
    time.sleep(0.2)
    assert len(backend.batches) == 1  # only the blocking job was ever computed


def test_expired_deadline_is_never_computed(
    backend: RecordingBackend, make_batcher: MakeBatcher
) -> None:
    batcher = make_batcher()
    block_scheduler(backend, batcher)
    late = batcher.submit([seq(4, 55)], deadline=time.time() - 1)
    ok = batcher.submit([seq(4, 66)], deadline=time.time() + 60)
    backend.release()
    with pytest.raises(Dropped):
        late.result(5)
    ok.result(5)
    computed = [s for b in backend.batches for s in b]
    assert seq(4, 55) not in computed
    assert seq(4, 66) in computed


def test_gone_check_failure_does_not_stop_compute(
    backend: RecordingBackend, make_batcher: MakeBatcher
) -> None:
    def broken(ids: list[str]) -> set[str]:
        raise ConnectionError("redis is away")

    batcher = make_batcher(gone=broken)
    out = batcher.run([seq(3)], request_id="r1")
    assert [v.shape for v in out] == [(backend.dimensions,)]


def test_a_failing_item_fails_its_own_job_alone(
    backend: RecordingBackend, make_batcher: MakeBatcher
) -> None:
    """One forward holds three jobs; the forward raises because of one item: the forward
    is split until that item is found, and the other jobs still get their vectors."""
    batcher = make_batcher()
    first = block_scheduler(backend, batcher)
    good = batcher.submit([seq(3, 2), seq(3, 3)])
    bad = batcher.submit([seq(3, 4), seq(3, 1)])  # its second item breaks any forward
    other = batcher.submit([seq(5, 7)])
    backend.fail_if = lambda batch: seq(3, 1) in batch
    backend.release()
    first.result(5)
    with pytest.raises(RuntimeError, match="out of memory"):
        bad.result(5)
    assert len(good.result(5)) == 2
    assert [v.shape for v in other.result(5)] == [(backend.dimensions,)]
    np.testing.assert_allclose(good.result()[0], batcher.run([seq(3, 2)])[0], atol=1e-6)
    # the split costs forwards logarithmic in the batch, not one per item
    assert len(backend.batches) <= 1 + 2 * 3 + 1 + 1
    backend.fail_if = None
    assert [v.shape for v in batcher.run([seq(2, 9)])] == [(backend.dimensions,)]  # serving


def test_a_forward_that_always_fails_fails_every_job(
    backend: RecordingBackend, make_batcher: MakeBatcher
) -> None:
    batcher = make_batcher()
    backend.fail_if = lambda batch: True
    futures = batcher.submit_many([[seq(3, i)] for i in range(4)], lane=BATCH)
    for f in futures:
        with pytest.raises(RuntimeError):
            f.result(5)
    backend.fail_if = None
    assert [v.shape for v in batcher.run([seq(2, 9)])] == [(backend.dimensions,)]


def test_items_of_a_failed_job_are_not_computed_again(
    backend: RecordingBackend, make_batcher: MakeBatcher
) -> None:
    """A job whose first item failed has nothing to gain from its others' forwards."""
    batcher = make_batcher(max_batch_size=1)
    backend.hold()
    bad = batcher.submit([seq(3, 1), seq(3, 2), seq(3, 3)], lane=BATCH)
    backend.fail_if = lambda batch: seq(3, 1) in batch
    backend.release()
    with pytest.raises(RuntimeError):
        bad.result(5)
    time.sleep(0.1)
    assert backend.batches == [[seq(3, 1)]]


def test_empty_submit_resolves_at_once(
    backend: RecordingBackend, make_batcher: MakeBatcher
) -> None:
    batcher = make_batcher()
    out = batcher.submit([]).result(1)
    assert out == []
    assert backend.batches == []


def test_stats_count_forwards_and_items(
    backend: RecordingBackend, make_batcher: MakeBatcher
) -> None:
    batcher = make_batcher(max_batch_size=3)
    batcher.run([seq(2, i) for i in range(7)])
    assert batcher.stats.forwards == 3
    assert batcher.stats.items == 7
    # cumulative counts per bucket bound (1, 2, 4, ...): sizes 3, 3, 1
    assert batcher.stats.sizes.counts[:4] == [1, 1, 3, 3]
    assert batcher.stats.sizes.counts[-1] == 3


# -- adaptive batching: wait for more only under load -------------------------------------


def wait_until_idle(batcher: Batcher) -> None:
    """Until the scheduler has closed its last forward. A job's future resolves before
    that, and a request sent in between counts as arriving during the forward (load)."""
    deadline = time.monotonic() + 5
    while True:
        with batcher._cond:
            if not batcher._in_forward:
                return
        assert time.monotonic() < deadline, "the scheduler never finished its forward"
        time.sleep(0.001)


def test_an_idle_lane_never_waits(backend: RecordingBackend, make_batcher: MakeBatcher) -> None:
    wait_s = 5.0
    batcher = make_batcher(live_wait_s=wait_s)
    for n in range(3):  # each arrives on an idle lane: none waits for company
        wait_until_idle(batcher)
        started = time.monotonic()
        batcher.submit([seq(4, 10 * n)]).result(wait_s + 1)
        assert time.monotonic() - started < wait_s / 2
    assert [len(b) for b in backend.batches] == [1, 1, 1]


def test_under_load_a_small_live_forward_waits_for_more(
    backend: RecordingBackend, make_batcher: MakeBatcher
) -> None:
    # long enough that B, sent wait_s / 4 after A's forward could have started, still
    # arrives within the wait on a slow machine
    wait_s = 2.0
    batcher = make_batcher(live_wait_s=wait_s)
    first = block_scheduler(backend, batcher)
    a = batcher.submit([seq(3, 100)])  # arrives while a forward runs: the lane is busy
    backend.release()
    first.result(5)
    time.sleep(wait_s / 4)
    b = batcher.submit([seq(3, 200)])  # joins A's forward instead of waiting behind it
    started = time.monotonic()
    a.result(5), b.result(5)
    assert time.monotonic() - started < wait_s + 0.5  # bounded by the setting
    assert [len(x) for x in backend.batches] == [1, 2]


def test_a_full_live_forward_does_not_wait(
    backend: RecordingBackend, make_batcher: MakeBatcher
) -> None:
    batcher = make_batcher(live_wait_s=5.0, max_batch_size=4)
    first = block_scheduler(backend, batcher)
    jobs = [batcher.submit([seq(3, 100 + n)]) for n in range(4)]
    backend.release()
    first.result(5)
    started = time.monotonic()
    for job in jobs:
        job.result(5)
    assert time.monotonic() - started < 2.5  # max_batch_size reached: no reason to wait
    assert [len(x) for x in backend.batches] == [1, 4]
