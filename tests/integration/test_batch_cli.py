"""`laneway batch` as a subprocess against a real stack with fake models: submit --wait
with progress and downloaded results, then status, list, Ctrl-C detach, cancel and
download on a slow batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Stack
from tests.integration.batch_support import (
    ENDPOINT,
    fake_entry,
    fake_stack,
    jsonl,
    requests,
    wait_finished,
    wait_running,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SLOW = "test/slow-fake"  # 0.5 s a forward pass, 10-line chunks: 600 lines run for a while


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = fake_stack(
        tmp_path_factory.mktemp("batch-cli-stack"),
        entries=[fake_entry(SLOW, 0.5)],
        env={"LANEWAY_CHUNK_LINES": "10", "LANEWAY_REAPER_INTERVAL_S": "1"},
    )
    try:
        yield stack
    finally:
        stack.close()


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LANEWAY_")}
    env.pop("OPENAI_API_KEY", None)
    return env


def cli(stack: Stack, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "laneway.batch_cli", *args, "--base-url", stack.base_url]
    return subprocess.run(
        argv, cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=120, check=False
    )


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_submit_wait_downloads_results_next_to_the_input(stack: Stack, tmp_path: Path) -> None:
    lines = requests(300)
    lines[41]["body"]["input"] = lines[250]["body"]["input"] = ""  # two 400s
    (tmp_path / "in.jsonl").write_bytes(jsonl(lines))
    started = time.monotonic()
    run = cli(
        stack,
        *("submit", "in.jsonl", "--endpoint", ENDPOINT, "--wait", "--interval", "0.2"),
        *("--metadata", "team=search"),
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    print(f"submit --wait took {time.monotonic() - started:.1f}s:\n{run.stdout}")
    progress = [x for x in run.stdout.splitlines() if x.startswith("batch_") and " done " in x]
    assert progress, run.stdout
    assert progress[-1].split("  ")[1:4] == ["completed", "300/300 done", "2 failed"]
    output = read_jsonl(tmp_path / "in.output.jsonl")
    errors = read_jsonl(tmp_path / "in.errors.jsonl")
    assert len(output) == 298 and len(errors) == 2
    assert [e["custom_id"] for e in errors] == ["r41", "r250"]
    assert {o["custom_id"] for o in output} == {f"r{i}" for i in range(300)} - {"r41", "r250"}

    batch_id = progress[-1].split()[0]
    status = cli(stack, "status", batch_id, cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert "status       completed" in status.stdout and "metadata     team=search" in status.stdout
    download = cli(stack, "download", batch_id, "--dir", "out", cwd=tmp_path)
    assert download.returncode == 0, download.stderr
    assert (tmp_path / "out" / f"{batch_id}.output.jsonl").read_bytes() == (
        tmp_path / "in.output.jsonl"
    ).read_bytes()
    assert len(read_jsonl(tmp_path / "out" / f"{batch_id}.errors.jsonl")) == 2


def test_bad_input_is_refused_before_upload(stack: Stack, tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_bytes(jsonl([*requests(3), b"[1, 2]"]))
    run = cli(stack, "submit", "bad.jsonl", "--endpoint", ENDPOINT, cwd=tmp_path)
    assert run.returncode == 2
    assert "line 4: must be a JSON object" in run.stderr


def test_status_list_detach_cancel_and_download_of_a_slow_batch(
    stack: Stack, tmp_path: Path, client: Any
) -> None:
    (tmp_path / "slow.jsonl").write_bytes(jsonl(requests(600, model=SLOW, prefix="s")))
    submit = cli(stack, "submit", "slow.jsonl", "--endpoint", ENDPOINT, cwd=tmp_path)
    assert submit.returncode == 0, submit.stderr
    batch_id = submit.stdout.split("created ")[1].split()[0]
    wait_running(client, batch_id)

    listing = cli(stack, "list", "--limit", "5", cwd=tmp_path)
    assert listing.returncode == 0 and f"{batch_id}  in_progress" in listing.stdout

    detach_with_ctrl_c(stack, batch_id, tmp_path)
    assert client.batches.retrieve(batch_id).status == "in_progress"  # not cancelled

    cancel = cli(stack, "cancel", batch_id, cwd=tmp_path)
    assert cancel.returncode == 0 and cancel.stdout.startswith(f"{batch_id} cancel")
    counts = wait_finished(client, batch_id).request_counts
    status = cli(stack, "status", batch_id, "--wait", "--interval", "0.2", cwd=tmp_path)
    assert status.returncode == 1 and "status       cancelled" in status.stdout

    download = cli(stack, "download", batch_id, "--dir", ".", cwd=tmp_path)
    assert download.returncode == 1, download.stderr  # written, but it did not complete
    assert 0 < counts.completed < counts.total == 600
    output = read_jsonl(tmp_path / f"{batch_id}.output.jsonl")
    assert len(output) == counts.completed
    assert len({x["custom_id"] for x in output}) == counts.completed
    errors = tmp_path / f"{batch_id}.errors.jsonl"
    assert not errors.exists() if counts.failed == 0 else len(read_jsonl(errors)) == counts.failed


def detach_with_ctrl_c(stack: Stack, batch_id: str, cwd: Path) -> None:
    argv = [sys.executable, "-m", "laneway.batch_cli", "status", batch_id, "--wait"]
    argv += ["--interval", "0.2", "--base-url", stack.base_url]
    proc = subprocess.Popen(
        argv, cwd=cwd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()  # the first progress line: it is following the batch
    assert first.startswith(f"{batch_id}  in_progress"), first
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, out + err
    assert f"laneway batch status {batch_id} --wait" in err
    assert f"laneway batch download {batch_id}" in err
