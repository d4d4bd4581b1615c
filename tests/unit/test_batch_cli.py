"""`laneway batch`: the input check, the progress line, output names, and the submit / wait
/ download flow against a fake server (httpx.MockTransport)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from laneway.batch_cli import main
from laneway.batch_cli.client import base_url
from laneway.batch_cli.input_file import check_jsonl, output_paths
from laneway.batch_cli.progress import Progress, format_duration, progress_line

ENDPOINT = "/v1/embeddings"


def line(custom_id: str = "a", **over: Any) -> dict[str, Any]:
    obj = {"custom_id": custom_id, "method": "POST", "url": ENDPOINT, "body": {"input": "x"}}
    obj.update(over)
    return obj


def write(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def run(argv: list[str], transport: httpx.BaseTransport | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(argv, transport=transport, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


# -- the input check --------------------------------------------------------------------------


def test_a_good_file_with_blank_lines_passes(tmp_path: Path) -> None:
    path = write(tmp_path / "in.jsonl", [line("a"), "", "   ", line("b")])
    assert check_jsonl(path, ENDPOINT) == (2, [])


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object, this is an array"),
        ('"text"', "must be a JSON object"),
        ({"method": "POST", "url": ENDPOINT, "body": {}}, "'custom_id' is missing"),
        (line("c") | {"custom_id": 7}, "'custom_id' must be a string"),
        (line("c", url="/v1/chat/completions"), "'url' is '/v1/chat/completions'"),
        (line("c", method="GET"), "'method' is 'GET', must be 'POST'"),
        (line("c", body=[1]), "'body' must be a JSON object"),
        (line("a"), "custom_id 'a' is used more than once"),
        ("[" * 5000 + "]" * 5000, "not valid JSON: it is nested too deeply"),
    ],
)
def test_a_bad_line_is_refused_before_upload_naming_its_line(
    tmp_path: Path, bad: Any, says: str
) -> None:
    path = write(tmp_path / "in.jsonl", [line("a"), "", bad, line("z")])

    def server(request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"nothing may be sent, got {request.method} {request.url}")

    code, _, err = run(["submit", str(path), "--endpoint", ENDPOINT], httpx.MockTransport(server))
    assert code == 2
    assert f"line 3: {says}" in err
    assert "nothing uploaded" in err


def test_the_check_stops_after_a_few_problems(tmp_path: Path) -> None:
    path = write(tmp_path / "in.jsonl", ["nope"] * 20)
    count, problems = check_jsonl(path, ENDPOINT)
    assert problems[:2] == [
        "line 1: not valid JSON (Expecting value at column 1)",
        "line 2: not valid JSON (Expecting value at column 1)",
    ]
    assert problems[-1] == "(stopped after 5 problems)" and len(problems) == 6
    assert count == 5


def test_an_empty_file_or_a_missing_one_is_bad_usage(tmp_path: Path) -> None:
    empty = write(tmp_path / "empty.jsonl", ["", ""])
    code, _, err = run(["submit", str(empty), "--endpoint", ENDPOINT])
    assert code == 2 and "no requests" in err
    code, _, err = run(["submit", str(tmp_path / "nope.jsonl"), "--endpoint", ENDPOINT])
    assert code == 2 and "no such file" in err


def test_bad_metadata_is_bad_usage(tmp_path: Path) -> None:
    path = write(tmp_path / "in.jsonl", [line()])
    with pytest.raises(SystemExit) as exc:
        run(["submit", str(path), "--endpoint", ENDPOINT, "--metadata", "novalue"])
    assert exc.value.code == 2


# -- names and settings -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "output", "errors"),
    [
        ("in.jsonl", "in.output.jsonl", "in.errors.jsonl"),
        ("my.data.jsonl", "my.data.output.jsonl", "my.data.errors.jsonl"),
        ("requests.txt", "requests.txt.output.jsonl", "requests.txt.errors.jsonl"),
        ("requests", "requests.output.jsonl", "requests.errors.jsonl"),
    ],
)
def test_output_files_lie_next_to_the_input(name: str, output: str, errors: str) -> None:
    assert output_paths(Path("/data") / name) == (Path("/data", output), Path("/data", errors))


def test_the_base_url_comes_from_the_flag_then_the_environment() -> None:
    env = {"LANEWAY_BASE_URL": "http://gpu-box:9000/v1/"}
    assert base_url(None, {}) == "http://127.0.0.1:8000"
    assert base_url(None, env) == "http://gpu-box:9000"
    assert base_url("https://laneway.example.com", env) == "https://laneway.example.com"


# -- the progress line ------------------------------------------------------------------------


def batch(status: str, completed: int, failed: int, total: int, **extra: Any) -> dict[str, Any]:
    counts = {"completed": completed, "failed": failed, "total": total}
    return {"id": "batch_abc", "status": status, "request_counts": counts, **extra}


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0:00:00"), (16.4, "0:00:16"), (75, "0:01:15"), (43_380, "12:03:00")]
)
def test_durations(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_the_line_shows_counts_rate_and_eta() -> None:
    line = progress_line(batch("in_progress", 1197, 3, 5000), 240.0)
    assert line == "batch_abc  in_progress  1200/5000 done  3 failed  240/s  ETA 0:00:16"
    assert progress_line(batch("validating", 0, 0, 0), None).endswith("-/s  ETA -")
    assert "ETA" not in progress_line(batch("completed", 5000, 0, 5000), 3.5)


def test_rate_and_eta_come_from_the_measured_change() -> None:
    out = io.StringIO()
    progress = Progress(out, tty=False, window=30)
    progress.update(batch("in_progress", 0, 0, 200), now=100.0)
    progress.update(batch("in_progress", 90, 10, 200), now=110.0)  # 100 in 10 s
    assert out.getvalue().splitlines()[-1].endswith("100/200 done  10 failed  10/s  ETA 0:00:10")
    progress.update(batch("in_progress", 140, 10, 200), now=120.0)  # 150 in 20 s
    assert out.getvalue().splitlines()[-1].endswith("7.5/s  ETA 0:00:07")
    # only the last 30 s count: from 150 done at t=120 to 180 at t=150
    progress.update(batch("in_progress", 140, 10, 200), now=140.0)
    progress.update(batch("in_progress", 170, 10, 200), now=150.0)
    assert out.getvalue().splitlines()[-1].endswith("180/200 done  10 failed  1.0/s  ETA 0:00:20")


def test_without_a_tty_a_line_is_printed_only_when_the_counts_change() -> None:
    out = io.StringIO()
    progress = Progress(out, tty=False)
    for now, b in enumerate(
        [
            batch("validating", 0, 0, 0),
            batch("in_progress", 0, 0, 10),
            batch("in_progress", 0, 0, 10),
            batch("in_progress", 5, 0, 10),
            batch("in_progress", 5, 0, 10),
            batch("completed", 9, 1, 10),
        ]
    ):
        progress.update(b, now=float(now))
    progress.finish()
    lines = out.getvalue().splitlines()
    assert [x.split("  ")[1:3] for x in lines] == [
        ["validating", "0/0 done"],
        ["in_progress", "0/10 done"],
        ["in_progress", "5/10 done"],
        ["completed", "10/10 done"],
    ]
    assert "\r" not in out.getvalue()


def test_on_a_tty_one_line_is_redrawn() -> None:
    out = io.StringIO()
    progress = Progress(out, tty=True)
    progress.update(batch("in_progress", 10, 0, 1000), now=0.0)
    progress.update(batch("in_progress", 20, 0, 1000), now=1.0)
    progress.update(batch("in_progress", 20, 0, 1000), now=2.0)
    progress.finish()
    text = out.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1
    assert "20/1000 done  0 failed  5.0/s  ETA 0:03:16" in text


# -- the flow against a fake server -----------------------------------------------------------


class FakeServer:
    """Answers the CLI's calls; ``retrieve`` walks ``states`` (the last one repeats)."""

    def __init__(self, states: list[dict[str, Any]], *, interrupt_at: int | None = None) -> None:
        self.states = states
        self.interrupt_at = interrupt_at
        self.calls: list[str] = []
        self.uploaded = b""
        self.created: dict[str, Any] = {}
        self.retrieves = 0
        self.files = {"file-out": b'{"custom_id": "a"}\n{"custom_id": "b"}\n', "file-err": b"{}\n"}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.calls.append(f"{request.method} {path}")
        handler = self.route(request.method, path)
        return handler(request)

    def route(self, method: str, path: str) -> Callable[[httpx.Request], httpx.Response]:
        if (method, path) == ("POST", "/v1/files"):
            return self.upload
        if (method, path) == ("POST", "/v1/batches"):
            return self.create
        if method == "GET" and path.startswith("/v1/files/"):
            return lambda _: httpx.Response(200, content=self.files[path.split("/")[3]])
        if method == "GET" and path.startswith("/v1/batches/"):
            return self.retrieve
        if method == "POST" and path.endswith("/cancel"):
            return lambda _: httpx.Response(200, json=self.states[-1] | {"status": "cancelling"})
        return lambda _: httpx.Response(404, json={"error": {"message": f"no route {path}"}})

    def upload(self, request: httpx.Request) -> httpx.Response:
        self.uploaded = request.read()
        return httpx.Response(200, json={"id": "file-in", "object": "file"})

    def create(self, request: httpx.Request) -> httpx.Response:
        self.created = json.loads(request.read())
        return httpx.Response(200, json=batch("validating", 0, 0, 0))

    def retrieve(self, _: httpx.Request) -> httpx.Response:
        self.retrieves += 1
        if self.retrieves == self.interrupt_at:
            raise KeyboardInterrupt
        return httpx.Response(200, json=self.states[min(self.retrieves, len(self.states)) - 1])


def finished(status: str, **files: Any) -> dict[str, Any]:
    return batch(status, 2, 1, 3, **files)


def test_submit_wait_follows_the_batch_and_downloads_next_to_the_input(tmp_path: Path) -> None:
    path = write(tmp_path / "in.jsonl", [line("a"), line("b"), line("c")])
    server = FakeServer(
        [
            batch("in_progress", 0, 0, 3),
            batch("in_progress", 1, 0, 3),
            finished("completed", output_file_id="file-out", error_file_id="file-err"),
        ]
    )
    argv = ["submit", str(path), "--endpoint", ENDPOINT, "--wait", "--interval", "0.001"]
    code, out, _ = run([*argv, "--metadata", "team=search"], httpx.MockTransport(server))
    assert code == 0
    assert server.created == {
        "input_file_id": "file-in",
        "endpoint": ENDPOINT,
        "completion_window": "24h",
        "metadata": {"team": "search"},
    }
    assert path.read_bytes() in server.uploaded  # the multipart body holds the file
    assert "batch_abc  in_progress  1/3 done" in out
    assert "batch_abc  completed  3/3 done  1 failed" in out
    assert (tmp_path / "in.output.jsonl").read_bytes() == server.files["file-out"]
    assert (tmp_path / "in.errors.jsonl").read_bytes() == server.files["file-err"]
    assert "in.output.jsonl (2 lines)" in out
    assert not list(tmp_path.glob("*.part"))


def test_the_api_key_is_a_bearer_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str | None] = []

    def server(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, json={"object": "list", "data": [], "has_more": False})

    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    run(["list"], httpx.MockTransport(server))
    run(["list", "--api-key", "sk-flag"], httpx.MockTransport(server))
    monkeypatch.delenv("OPENAI_API_KEY")
    run(["list"], httpx.MockTransport(server))
    assert seen == ["Bearer sk-env", "Bearer sk-flag", None]


def test_a_failed_batch_exits_1_with_its_errors(tmp_path: Path) -> None:
    path = write(tmp_path / "in.jsonl", [line("a")])
    errors = {"object": "list", "data": [{"code": "model_not_found", "line": 1, "message": "m?"}]}
    server = FakeServer([batch("failed", 0, 0, 0, errors=errors)])
    argv = ["submit", str(path), "--endpoint", ENDPOINT, "--wait", "--interval", "0.001"]
    code, out, _ = run(argv, httpx.MockTransport(server))
    assert code == 1
    assert "batch batch_abc failed" in out and "line 1: m? (model_not_found)" in out
    assert not (tmp_path / "in.output.jsonl").exists()


def test_ctrl_c_while_waiting_detaches_without_cancelling(tmp_path: Path) -> None:
    path = write(tmp_path / "in.jsonl", [line("a")])
    server = FakeServer([batch("in_progress", 0, 0, 1)], interrupt_at=2)
    argv = ["submit", str(path), "--endpoint", ENDPOINT, "--wait", "--interval", "0.001"]
    code, _, err = run(argv, httpx.MockTransport(server))
    assert code == 130
    assert "laneway batch status batch_abc --wait" in err
    assert "laneway batch download batch_abc" in err
    assert "not cancelled" in err
    assert not [c for c in server.calls if c.endswith("/cancel")]


def test_an_http_error_prints_the_servers_message() -> None:
    def server(_: httpx.Request) -> httpx.Response:
        body = {"error": {"message": "No batch found with id 'batch_x'.", "type": "x"}}
        return httpx.Response(404, json=body)

    code, _, err = run(["status", "batch_x"], httpx.MockTransport(server))
    assert code == 1
    assert "HTTP 404: No batch found with id 'batch_x'." in err


def test_status_cancel_and_download(tmp_path: Path) -> None:
    done = finished("cancelled", output_file_id="file-out", error_file_id=None)
    server = FakeServer([done | {"input_file_id": "file-in", "metadata": {"k": "v"}}])
    transport = httpx.MockTransport(server)
    code, out, _ = run(["status", "batch_abc"], transport)
    assert code == 0
    assert "status       cancelled" in out and "output file  file-out" in out
    assert "metadata     k=v" in out and "error file   -" in out
    code, out, _ = run(["cancel", "batch_abc"], transport)
    assert (code, out) == (0, "batch_abc cancelling\n")
    code, out, _ = run(["download", "batch_abc", "--dir", str(tmp_path / "d")], transport)
    assert code == 1  # downloaded, but the batch did not complete
    assert (tmp_path / "d" / "batch_abc.output.jsonl").read_bytes() == server.files["file-out"]
    assert not (tmp_path / "d" / "batch_abc.errors.jsonl").exists()


def test_download_of_a_running_batch_says_to_wait(tmp_path: Path) -> None:
    server = FakeServer([batch("in_progress", 1, 0, 3)])
    code, _, err = run(
        ["download", "batch_abc", "--dir", str(tmp_path)], httpx.MockTransport(server)
    )
    assert code == 1 and "laneway batch status batch_abc --wait" in err
    assert not list(tmp_path.iterdir())


def test_list_prints_one_row_a_batch() -> None:
    rows = [batch("in_progress", 5, 1, 9, endpoint=ENDPOINT, created_at=0)]
    page = {"object": "list", "data": rows, "has_more": True}
    limits: list[str | None] = []

    def server(request: httpx.Request) -> httpx.Response:
        limits.append(request.url.params.get("limit"))
        return httpx.Response(200, json=page)

    code, out, _ = run(["list", "--limit", "1"], httpx.MockTransport(server))
    assert code == 0 and limits == ["1"]
    assert out.splitlines()[0] == (
        "batch_abc  in_progress  /v1/embeddings  6/9 done  1 failed  1970-01-01 00:00:00 UTC"
    )
    assert "more batches" in out
