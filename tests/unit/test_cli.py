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


def test_flower_gets_the_broker_url_with_its_password_in_the_environment() -> None:
    from configs.settings import Settings
    from laneway.cli import flower_command

    url = "redis://:R3dis-Pass-word@127.0.0.1:6379/0"
    settings = Settings(redis_url=url, flower_basic_auth="ops:Fl0wer-pw")
    argv, env = flower_command(settings, "127.0.0.1", 5555, {"BROKER_URL": "redis://other/0"})
    # ps shows argv to every local user: no secret may be in it
    for secret in ("R3dis-Pass-word", "Fl0wer-pw", url):
        assert not any(secret in arg for arg in argv), argv
    assert "--broker" not in argv and "-b" not in argv
    assert argv[argv.index("celery") + 1] == "flower"
    assert env["CELERY_BROKER_URL"] == url  # Celery's app reads it (celery/app/utils.py)
    assert "BROKER_URL" not in env  # the celery command would take it as --broker
