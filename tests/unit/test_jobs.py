"""workers.jobs.departed: the one "has the caller gone?" check every engine runs, and the
throttle the engines pace it with."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import pytest

from tasks.queue.names import BATCH, LIVE, Lane
from workers.jobs import FRESH_S, Dropped, JobMeta, Throttle, departed

NOW = 1_000_000.0
OLD = NOW - 1.0  # sent long enough ago to be looked up


@dataclass(eq=False)
class Job:
    meta: JobMeta
    lane: Lane = LIVE
    answering: bool = False
    future: Future[Any] = field(default_factory=Future)


class Gone:
    """A ``GoneCheck`` that records each look-up."""

    def __init__(self, *ids: str) -> None:
        self.ids = set(ids)
        self.asked: list[list[str]] = []

    def __call__(self, request_ids: list[str]) -> set[str]:
        self.asked.append(list(request_ids))
        return self.ids & set(request_ids)


def test_a_caller_that_hung_up_is_dropped_and_the_others_stay() -> None:
    left, stays = Job(JobMeta("left", None, OLD)), Job(JobMeta("stays", None, OLD))
    gone = Gone("left")
    dead = departed([left, stays], gone, now=NOW)
    assert list(dead) == [left]
    assert isinstance(dead[left], Dropped) and "left" in str(dead[left])
    assert gone.asked == [["left", "stays"]]  # one look-up for every job


def test_a_request_without_sent_at_is_looked_up() -> None:
    job = Job(JobMeta("r", None, None))
    assert list(departed([job], Gone("r"), now=NOW)) == [job]


def test_fresh_requests_skip_the_look_up() -> None:
    fresh = Job(JobMeta("new", None, NOW - FRESH_S / 2))
    gone = Gone("new")
    assert departed([fresh], gone, now=NOW) == {}
    assert gone.asked == []


def test_batch_jobs_and_jobs_without_an_id_are_not_looked_up() -> None:
    gone = Gone("b")
    jobs = [Job(JobMeta("b", None, OLD), lane=BATCH), Job(JobMeta(None, None, OLD))]
    assert departed(jobs, gone, now=NOW) == {}
    assert gone.asked == []


def test_no_gone_check_means_no_look_up() -> None:
    job = Job(JobMeta("r", None, OLD))
    assert departed([job], None, now=NOW) == {}


@pytest.mark.parametrize("lane", [LIVE, BATCH])
def test_a_deadline_passed_before_the_first_result_drops_the_job(lane: Lane) -> None:
    late = Job(JobMeta("late", NOW - 0.1, OLD), lane=lane)
    on_time = Job(JobMeta(None, NOW + 60, OLD), lane=lane)
    gone = Gone()
    dead = departed([late, on_time], gone, now=NOW)
    assert list(dead) == [late] and "deadline" in str(dead[late])
    assert gone.asked == []  # dropped already: no look-up for it


def test_a_deadline_no_longer_applies_once_the_answer_is_under_way() -> None:
    running = Job(JobMeta("r", NOW - 0.1, OLD), answering=True)
    gone = Gone()
    assert departed([running], gone, now=NOW) == {}
    assert gone.asked == [["r"]]  # its caller can still hang up


def test_a_future_done_outside_drops_the_job_without_a_look_up() -> None:
    timed_out, cancelled = Job(JobMeta("t", None, OLD)), Job(JobMeta("c", None, OLD))
    timed_out.future.set_exception(TimeoutError("the chunk timed out"))
    cancelled.future.cancel()
    gone = Gone()
    assert set(departed([timed_out, cancelled], gone, now=NOW)) == {timed_out, cancelled}
    assert gone.asked == []


def test_a_failing_look_up_counts_nobody_gone_and_keeps_the_other_checks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(request_ids: list[str]) -> set[str]:
        raise ConnectionError("redis is away")

    here, late = Job(JobMeta("here", None, OLD)), Job(JobMeta("late", NOW - 1, OLD))
    with caplog.at_level(logging.WARNING, logger="workers.jobs"):
        dead = departed([here, late], broken, now=NOW)
    assert list(dead) == [late]
    assert "redis is away" in caplog.text


def test_a_job_named_twice_is_checked_once() -> None:
    job = Job(JobMeta("r", None, OLD))
    gone = Gone("r")
    assert list(departed([job, job, job], gone, now=NOW)) == [job]
    assert gone.asked == [["r"]]


def test_the_clock_defaults_to_now() -> None:
    late = Job(JobMeta(None, time.time() - 1, None))
    assert list(departed([late], None)) == [late]


def test_throttle_is_due_once_per_interval_and_when_forced() -> None:
    throttle = Throttle(every_s=60)
    assert throttle.due()
    assert not throttle.due()
    assert throttle.due(force=True)
    assert not throttle.due()
    assert Throttle(every_s=0).due() and Throttle(every_s=0).due()
