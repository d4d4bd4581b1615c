"""tasks/benchmarks: records (a benchmark run, rolling folds), the rate estimates go by,
and a batch's estimated completion time."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from laneway.batch_cli.progress import progress_line
from tasks.benchmarks import records
from tasks.benchmarks.estimate import Progress, Rate, choose, completion_at, seconds_for
from tasks.benchmarks.records import BENCHMARK, ROLLING, Measured, Sample
from tasks.benchmarks.service import Shape, completions, estimate, lines_ahead, queued
from tasks.store.db import session_scope
from tasks.store.models import BatchRow, BenchmarkRow

MODEL = "m"


def measured(concurrency: int, rps: float, **kw: Any) -> Measured:
    base: dict[str, Any] = {
        "model": MODEL,
        "capability": "embeddings",
        "engine": "E",
        "device": "cpu",
        "workers": 1,
        "concurrency": concurrency,
        "requests": 100,
        "success_rate": 1.0,
        "requests_per_s": rps,
    }
    return Measured(**{**base, **kw})


def sample(rps: float | None, ups: float | None = None, **kw: Any) -> Sample:
    base: dict[str, Any] = {
        "model": MODEL,
        "capability": "chat",
        "engine": "E",
        "device": "cpu",
        "requests_per_s": rps,
        "units_per_s": ups,
        "unit": "completion_tokens" if ups is not None else None,
        "batch_size": 4.0,
    }
    return Sample(**{**base, **kw})


def row(**kw: Any) -> BenchmarkRow:
    base: dict[str, Any] = {
        "id": 1,
        "source": BENCHMARK,
        "workers": 1,
        "success_rate": 1.0,
        "updated_at": 100,
        "requests_per_s": None,
        "units_per_s": None,
        "unit": None,
    }
    return BenchmarkRow(**{**base, **kw})


# -- the rate -------------------------------------------------------------------------------


def test_a_benchmark_run_is_chosen_by_its_best_row_and_scaled_by_workers() -> None:
    rows = [
        row(id=1, requests_per_s=50.0),
        row(id=2, requests_per_s=200.0),
        row(id=3, source=ROLLING, requests_per_s=900.0),
    ]
    rate = choose(rows)
    assert rate is not None and rate.source == BENCHMARK and rate.record_ids == (2,)
    assert rate.requests_per_s == 200.0
    twice = choose(rows, workers=2)
    assert twice is not None and twice.requests_per_s == 400.0


def test_rolling_rows_count_per_worker_when_no_run_exists() -> None:
    rows = [
        row(id=3, source=ROLLING, requests_per_s=90.0),
        row(id=4, source=ROLLING, requests_per_s=110.0),
    ]
    rate = choose(rows, workers=3)
    assert rate is not None and rate.source == ROLLING
    assert rate.requests_per_s == pytest.approx(300.0)
    assert choose([]) is None
    assert choose([row(requests_per_s=None)]) is None  # a row with no rate says nothing


def test_a_line_costs_its_size_at_the_units_rate_else_one_request() -> None:
    rate = Rate(BENCHMARK, 2.0, 100.0, "completion_tokens", 0, (1,))
    assert rate.line_seconds(input_tokens=None, output_tokens=200) == 2.0  # 200 tokens at 100/s
    assert rate.line_seconds(input_tokens=999, output_tokens=None) == 0.5  # per request
    assert seconds_for(rate, 10, output_tokens=50) == 5.0
    assert (
        Rate(ROLLING, None, None, None, 0, ()).line_seconds(input_tokens=1, output_tokens=1) is None
    )
    # seconds of audio a second, for lines of unknown length: no estimate, never infinity
    speech = Rate(ROLLING, None, 20.0, "audio_seconds", 0, ())
    assert seconds_for(speech, 10) is None and seconds_for(None, 10) is None


def test_odd_records_give_no_rate_rather_than_a_nan() -> None:
    assert choose([row(requests_per_s=float("nan"))]) is None
    assert choose([row(requests_per_s=0.0), row(id=2, units_per_s=-1.0, unit="tokens")]) is None
    assert choose([row(requests_per_s=5.0, success_rate=0.0)]) is None


# -- a batch's completion time --------------------------------------------------------------


def test_before_it_runs_a_batch_waits_for_the_work_ahead() -> None:
    p = Progress("validating", 1000, 0, None)
    assert completion_at(p, now=1000.0, prior_s=10.0, ahead_s=5.0) == 1015
    assert completion_at(p, now=1000.0, prior_s=None) is None
    assert completion_at(Progress("completed", 10, 10, 1), now=5.0, prior_s=1.0) is None


def test_its_own_pace_takes_over_as_it_progresses() -> None:
    # 200 of 1000 done in 20 s: 80 s to go at its own pace, whatever the records said
    at_20 = Progress("in_progress", 1000, 200, 980)
    assert completion_at(at_20, now=1000.0, prior_s=10.0) == 1080
    # 5 % done: half its own pace (95 s to go), half the prior (10 s)
    at_5 = Progress("in_progress", 1000, 50, 995)
    assert completion_at(at_5, now=1000.0, prior_s=10.0) == round(1000 + 0.5 * 95 + 0.5 * 10)
    # no records: its own pace alone
    assert completion_at(at_5, now=1000.0, prior_s=None) == 1095
    # a running speech batch whose rate says nothing of its lines: its own pace
    assert completion_at(at_20, now=1000.0, prior_s=seconds_for(None, 800)) == 1080
    assert completion_at(at_5, now=1000.0, prior_s=float("nan")) is None


# -- records --------------------------------------------------------------------------------


def test_a_run_is_stored_and_read_back_newest_first(db: None) -> None:
    with session_scope() as s:
        first = records.add_run(s, [measured(1, 10.0), measured(4, 30.0)], now=100)
        second = records.add_run(s, [measured(1, 12.0, sample_response="x" * 5000)], now=200)
    with session_scope() as s:
        rows = records.for_model(s, MODEL, limit=10)
        assert [r.run_id for r in rows] == [second, first, first]
        assert len(rows[0].sample_response or "") == records.MAX_SAMPLE_CHARS
        latest = records.for_models(s, [MODEL, "other"])
        assert [r.run_id for r in latest[MODEL]] == [second] and latest["other"] == []
        public = records.public(rows[0])
        assert public["object"] == "benchmark.record" and public["measured_at"] == 200
        assert records.models(s) == [MODEL]


def test_rolling_folds_move_one_row_per_model_engine_and_device(db: None) -> None:
    with session_scope() as s:
        records.fold_rolling(s, sample(None, 100.0), now=10)
        records.fold_rolling(s, sample(None, 200.0), now=20)
        records.fold_rolling(s, sample(None, 50.0, device="cuda:0"), now=30)
    with session_scope() as s:
        rows = {r.device: r for r in records.for_model(s, MODEL, limit=10)}
    assert set(rows) == {"cpu", "cuda:0"}
    w = records.ROLLING_WEIGHT
    assert rows["cpu"].units_per_s == pytest.approx(100 * (1 - w) + 200 * w)
    assert rows["cpu"].requests_per_s is None and rows["cpu"].updated_at == 20
    assert rows["cpu"].source == ROLLING and rows["cpu"].unit == "completion_tokens"


def test_workers_folding_at_once_each_count(db: None) -> None:
    """Many threads fold into one row at once: one row, every fold applied (the moving
    average of identical samples stays put; none raises)."""
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(10):
                with session_scope() as s:
                    records.fold_rolling(s, sample(50.0))
        except BaseException as exc:  # pragma: no cover - the failure itself
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with session_scope() as s:
        [only] = records.for_model(s, MODEL, limit=10)
    assert only.requests_per_s == pytest.approx(50.0)


# -- estimates from the database ------------------------------------------------------------


def add_batch(batch_id: str, created_at: int, status: str, total: int, done: int = 0) -> None:
    with session_scope() as s:
        s.add(
            BatchRow(
                id=batch_id,
                endpoint="/v1/embeddings",
                input_file_id="file-x",
                completion_window="24h",
                status=status,
                model=MODEL,
                created_at=created_at,
                in_progress_at=created_at if status == "in_progress" else None,
                request_total=total,
                request_completed=done,
            )
        )


def test_an_estimate_counts_the_lines_queued_ahead(db: None) -> None:
    add_batch("batch_a", 1, "in_progress", 1000, done=400)
    add_batch("batch_b", 2, "validating", 0)
    add_batch("batch_c", 3, "completed", 500, done=500)
    with session_scope() as s:
        no_record = estimate(s, Shape(MODEL, 100))
        records.add_run(s, [measured(16, 100.0)])
    assert no_record["seconds"] is None and no_record["queued_ahead_lines"] == 600
    with session_scope() as s:
        out = estimate(s, Shape(MODEL, 100))
        queue = queued(s, [MODEL])[MODEL]
    assert out["queued_ahead_lines"] == 600 and out["run_seconds"] == 1.0
    assert out["seconds"] == pytest.approx(7.0) and out["basis"]["source"] == BENCHMARK
    assert lines_ahead(queue, 2, "batch_b") == 600 and lines_ahead(queue, 1, "batch_a") == 0


def test_batch_objects_carry_their_estimate(db: None) -> None:
    add_batch("batch_a", 1000, "in_progress", 1000, done=200)
    add_batch("batch_b", 1001, "validating", 300)
    add_batch("batch_c", 1002, "completed", 10, done=10)
    with session_scope() as s:
        records.add_run(s, [measured(16, 100.0)])
    with session_scope() as s:
        rows = list(s.query(BatchRow).order_by(BatchRow.created_at))
        etas = completions(s, rows, now=1020.0)
    assert etas["batch_a"] == 1020 + 80  # 200 lines in 20 s: its own pace
    assert etas["batch_b"] == 1020 + 3 + 8  # its 300 lines and the 800 ahead at 100/s
    assert "batch_c" not in etas


# -- the CLI's progress line ----------------------------------------------------------------


def test_the_progress_line_shows_the_server_estimate() -> None:
    batch: dict[str, Any] = {
        "id": "batch_x",
        "status": "in_progress",
        "request_counts": {"total": 100, "completed": 10, "failed": 0},
        "estimated_completion_at": 1090,
    }
    assert progress_line(batch, 1.0, wall=1000.0).endswith("ETA 0:01:30")
    batch["estimated_completion_at"] = None
    assert progress_line(batch, 1.0, wall=1000.0).endswith("ETA 0:01:30")  # 90 at 1/s


# -- a worker's rolling rates ---------------------------------------------------------------


def snapshot(forwards: int, items: int, seconds: float, **counters: float) -> dict[str, Any]:
    return {"forwards": forwards, "items": items, "forward_seconds": {"sum": seconds}, **counters}


def test_rolling_rates_are_per_second_of_forwards_over_a_busy_interval() -> None:
    from workers.rolling import MIN_BUSY_S, RollingRates

    rates = RollingRates(capability="embeddings", device="cpu")
    engines = {MODEL: "E"}
    assert rates.samples({MODEL: snapshot(10, 80, 1.0)}, engines) == []  # takes note
    assert rates.samples({MODEL: snapshot(11, 90, 1.0 + MIN_BUSY_S / 2)}, engines) == []
    [one] = rates.samples({MODEL: snapshot(30, 480, 5.0)}, engines)  # quiet ones add up
    assert one.requests_per_s == pytest.approx(400 / 4.0) and one.batch_size == 20
    assert one.units_per_s is None and one.engine == "E" and one.device == "cpu"
    # a restarted engine's counts begin again: noted, not a negative rate
    assert rates.samples({MODEL: snapshot(1, 8, 0.1)}, engines) == []

    chat = RollingRates(capability="chat", device="cuda:0")
    chat.samples({MODEL: snapshot(0, 0, 0.0, completion_tokens=0)}, engines)
    [step] = chat.samples({MODEL: snapshot(100, 400, 2.0, completion_tokens=400)}, engines)
    assert step.requests_per_s is None  # decode steps' items are tokens, not requests
    assert step.units_per_s == 200.0 and step.unit == "completion_tokens"
