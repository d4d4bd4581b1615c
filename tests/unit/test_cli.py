"""The CLI's pure decisions: how many API processes, what `laneway api` accepts."""

from __future__ import annotations

import importlib.util

import pytest

from laneway.cli import build_parser, default_api_workers


@pytest.mark.parametrize(("cpus", "want"), [(1, 1), (2, 1), (4, 1), (8, 2), (16, 4), (96, 4)])
def test_laneway_up_runs_one_api_process_per_four_cores(cpus: int, want: int) -> None:
    assert default_api_workers(cpus) == want


def test_api_takes_a_process_count() -> None:
    args = build_parser().parse_args(["api", "--workers", "3", "--port", "9000"])
    assert (args.workers, args.port) == (3, 9000)
    assert build_parser().parse_args(["api"]).workers is None  # LANEWAY_API_WORKERS, else 1


@pytest.mark.parametrize("bad", ["0", "-2", "65", "two", ""])
def test_api_refuses_a_process_count_out_of_range(bad: str) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["api", "--workers", bad])


def test_the_fast_loop_and_parser_are_installed() -> None:
    # uvicorn's "auto" picks these when present; without them the API is markedly slower
    assert importlib.util.find_spec("uvloop") is not None
    assert importlib.util.find_spec("httptools") is not None
