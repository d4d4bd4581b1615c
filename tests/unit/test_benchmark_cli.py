"""`laneway benchmark`'s pure parts and its flow against a mocked server: percentiles and
rates, a step's record, the batch size from /metrics, the arguments, the request each
capability's hook makes (checked by that capability's own request schema), and the exit
codes of an unknown model, a model with no worker and a run where every request fails."""

from __future__ import annotations

import argparse
import io
import json
import math
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest

from configs.capabilities import CAPABILITIES, REGISTRY
from laneway.benchmark_cli import commands, forwards, probe
from laneway.benchmark_cli.load import Outcome, Step
from laneway.benchmark_cli.probe import Target
from laneway.benchmark_cli.stats import first_error, mean, percentile, rate, summarize
from laneway.benchmark_cli.sweep import clip_bytes
from laneway.cli import build_parser
from tasks.contracts import audio, chat, classify, embeddings, rerank
from tasks.contracts.base import BenchRequest, bench_text, usage_of

MODEL = "me/model"

# -- stats -------------------------------------------------------------------------------------


@pytest.mark.parametrize("q", [0, 5, 50, 90, 95, 99, 100])
@pytest.mark.parametrize("values", [[3.0], [1.0, 2.0], [5.0, 1.0, 4.0, 2.0, 3.0], [0.1] * 7])
def test_percentiles_match_numpys_linear_interpolation(values: list[float], q: float) -> None:
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_of_nothing_is_none_and_q_is_bounded() -> None:
    assert percentile([], 50) is None
    with pytest.raises(ValueError, match="between 0 and 100"):
        percentile([1.0], 101)


def test_means_and_rates() -> None:
    assert mean([1.0, None, 3.0]) == 2.0
    assert mean([None, None]) is None
    assert rate(10, 4.0) == 2.5
    assert rate(10, 0.0) == 0.0


TARGET = Target(
    model=MODEL, capability="chat", engine="e", device="cpu", workers=2, context_length=512
)


def test_a_steps_record_counts_successes_for_rates_and_latencies() -> None:
    outcomes = [
        Outcome(ok=True, latency_s=1.0, ttft_s=0.1, units=10, input_tokens=5, text="hi"),
        Outcome(ok=True, latency_s=3.0, ttft_s=0.3, units=30, input_tokens=7, output_tokens=4),
        Outcome(ok=False, latency_s=0.01, error="HTTP 503: no"),
        Outcome(ok=True, latency_s=2.0, units=20, text="later"),
    ]
    row = summarize(Step(4, 2.0, outcomes), TARGET, unit="completion_tokens", batch_size=3.5)
    assert (row.model, row.capability, row.engine, row.device, row.workers) == (
        MODEL,
        "chat",
        "e",
        "cpu",
        2,
    )
    assert (row.concurrency, row.requests, row.success_rate) == (4, 4, 0.75)
    assert row.requests_per_s == 1.5  # 3 successes in 2 s
    assert row.units_per_s == 30.0  # 60 units in 2 s
    assert row.unit == "completion_tokens"
    assert row.latency_p50_s == 2.0  # the failure's 0.01 s is not a latency
    assert row.latency_p95_s == pytest.approx(2.9)
    assert row.ttft_p50_s == pytest.approx(0.2)
    assert (row.input_tokens, row.output_tokens) == (6.0, 4.0)
    assert (row.batch_size, row.context_length, row.sample_response) == (3.5, 512, "hi")


def test_a_step_where_everything_failed() -> None:
    failed = [Outcome(ok=False, latency_s=0.1, error=f"e{i}") for i in range(3)]
    row = summarize(Step(2, 1.0, failed), TARGET, unit="tokens", batch_size=None)
    assert (row.success_rate, row.requests_per_s, row.units_per_s) == (0.0, 0.0, None)
    assert row.latency_p50_s is row.ttft_p50_s is row.sample_response is None
    assert first_error([Step(1, 1.0, [Outcome(ok=True, latency_s=1)]), Step(2, 1, failed)]) == "e0"


# -- batch size from /metrics ----------------------------------------------------------------


def exposition(values: dict[tuple[str, str], tuple[float, float]]) -> str:
    lines = ["# TYPE laneway_forward_batch_size histogram"]
    for (model, worker), (total, count) in values.items():
        labels = f'model="{model}",worker="{worker}"'
        lines.append(f'laneway_forward_batch_size_bucket{{{labels},le="+Inf"}} {count}')
        lines.append(f"laneway_forward_batch_size_count{{{labels}}} {count}")
        lines.append(f"laneway_forward_batch_size_sum{{{labels}}} {total}")
    return "\n".join(lines) + "\n"


def test_totals_are_per_worker_of_the_model() -> None:
    text = exposition({(MODEL, "w1"): (10, 4), (MODEL, "w2"): (6, 2), ("other", "w1"): (99, 9)})
    assert forwards.parse_totals(text, MODEL) == {"w1": (10.0, 4.0), "w2": (6.0, 2.0)}
    assert forwards.parse_totals(text, "none") == {}


def test_batch_size_is_the_delta_of_sums_over_the_delta_of_counts() -> None:
    before = {"w1": (10.0, 4.0)}
    assert forwards.batch_size(before, {"w1": (40.0, 10.0), "w2": (6.0, 2.0)}) == 36 / 8
    assert forwards.batch_size(before, before) is None  # no forward ran
    assert forwards.batch_size(None, before) is None  # /metrics did not answer
    # a worker that restarted counts from zero
    assert forwards.batch_size({"w1": (100.0, 50.0)}, {"w1": (8.0, 2.0)}) == 4.0


# -- arguments -------------------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["benchmark", *argv])


def test_the_defaults() -> None:
    args = parse(MODEL)
    assert args.func is commands.cmd_benchmark
    assert args.concurrency == (1, 4, 16)
    assert (args.requests, args.duration, args.input_tokens, args.output_tokens) == (
        None,
        None,
        None,
        64,
    )
    assert (args.timeout, args.no_store, args.json, args.clip) == (30.0, False, False, None)
    plan = commands.plan_of(args)
    from laneway.benchmark_cli.sweep import fitted_input_tokens, requests_per_step

    assert [requests_per_step(plan, c) for c in (1, 4, 16)] == [32, 32, 128]
    assert fitted_input_tokens(plan, 256) == 128
    assert fitted_input_tokens(plan, 128) == 64
    assert fitted_input_tokens(plan, None) == 128


def test_options() -> None:
    args = parse(MODEL, "--concurrency", "4, 1,4", "--requests", "7", "--input-tokens", "9")
    assert args.concurrency == (4, 1)  # in the order given, repeats dropped
    plan = commands.plan_of(args)
    from laneway.benchmark_cli.sweep import fitted_input_tokens, requests_per_step

    assert requests_per_step(plan, 16) == 7
    assert fitted_input_tokens(plan, 4) == 9  # asked for: as asked
    timed = commands.plan_of(parse(MODEL, "--duration", "2.5"))
    assert (timed.duration_s, requests_per_step(timed, 4)) == (2.5, None)


@pytest.mark.parametrize(
    "argv",
    [
        ["--concurrency", "0"],
        ["--concurrency", ","],
        ["--concurrency", "two"],
        ["--concurrency", "2000"],
        ["--requests", "0"],
        ["--duration", "0"],
        ["--requests", "4", "--duration", "1"],
        ["--timeout", "-1"],
        [],  # no model
    ],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    model = [] if not argv else [MODEL]
    with pytest.raises(SystemExit) as info:
        parse(*model, *argv)
    assert info.value.code == 2


def test_the_connection_takes_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LANEWAY_BASE_URL", "http://h:9/v1/")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("LANEWAY_API_KEY", "lw-key")
    connection = commands.connection_of(parse(MODEL))
    assert (connection.url, connection.api_key) == ("http://h:9", "lw-key")
    monkeypatch.setenv("OPENAI_API_KEY", "oa-key")
    assert commands.connection_of(parse(MODEL)).api_key == "oa-key"
    assert commands.connection_of(parse(MODEL, "--api-key", "k")).api_key == "k"


# -- the hooks -----------------------------------------------------------------------------


def request_of(capability: str, seq: int = 1, **kw: Any) -> BenchRequest:
    hook = REGISTRY[capability].contract_module().bench_request
    sizes = {"input_tokens": 32, "output_tokens": 8, "clip": clip_bytes(None), "seq": seq}
    request: BenchRequest = hook(MODEL, **(sizes | kw))
    return request


def test_every_capability_has_the_hook() -> None:
    for capability in CAPABILITIES:
        request = request_of(capability)
        assert isinstance(request, BenchRequest)
        assert request.path.startswith("/v1/")
        assert (request.json is None) != (request.form is None)  # one body
        assert request.unit


VALIDATORS: dict[str, Callable[[BenchRequest], Any]] = {
    "embeddings": lambda r: embeddings.parse_body(r.json),
    "chat": lambda r: chat.parse_body(r.json),
    "rerank": lambda r: rerank.parse_body(r.json),
    "classify": lambda r: classify.parse_body(r.json),
    "audio": lambda r: audio.parse_form(r.form or {}),
}


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_the_hooks_bodies_pass_their_own_schema(capability: str) -> None:
    request = request_of(capability)
    parsed = VALIDATORS[capability](request)
    assert parsed.model == MODEL


@pytest.mark.parametrize("capability", ["embeddings", "chat", "rerank", "classify"])
def test_text_differs_per_request(capability: str) -> None:
    assert request_of(capability, 1).json != request_of(capability, 2).json
    assert request_of(capability, 3).json == request_of(capability, 3).json  # reproducible


def test_bench_text_is_as_long_as_asked_and_unique() -> None:
    assert len(bench_text(64, 12345).split()) == 62  # 2 tokens for [CLS] and [SEP]
    assert len({bench_text(3, s) for s in range(5000)}) == 5000
    assert bench_text(1, 0)  # never empty


def test_embeddings_reads_input_tokens() -> None:
    request = request_of("embeddings")
    assert request.json is not None and request.json["encoding_format"] == "float"
    answer = {"data": [{"embedding": [0.5] * 384}], "usage": {"prompt_tokens": 30}}
    assert (request.unit, request.units(answer), request.input_tokens(answer)) == (
        "tokens",
        30.0,
        30.0,
    )
    assert request.text(answer).endswith("(384 dimensions)")
    assert not request.stream


def test_chat_streams_and_reads_completion_tokens() -> None:
    request = request_of("chat", output_tokens=5)
    assert request.stream and request.json is not None
    assert request.json["max_tokens"] == 5
    assert request.json["stream_options"] == {"include_usage": True}
    chunk = {"choices": [{"index": 0, "delta": {"content": "Hel"}}]}
    usage = {"choices": [], "usage": {"prompt_tokens": 40, "completion_tokens": 5}}
    assert request.text(chunk) == "Hel" and request.text(usage) == ""
    assert request.units(chunk) is None and request.units(usage) == 5.0
    assert (request.input_tokens(usage), request.output_tokens(usage)) == (40.0, 5.0)
    assert request.unit == "completion_tokens"


def test_audio_sends_the_clip_and_reads_seconds() -> None:
    request = request_of("audio")
    assert request.file is not None and request.file[1] == clip_bytes(None)
    assert request.file[1][:4] == b"RIFF"  # the packaged WAV
    assert request.form == {"model": MODEL, "response_format": "verbose_json"}
    answer = {"text": " hello", "duration": 3.438, "usage": {"type": "duration", "seconds": 4}}
    assert (request.unit, request.units(answer), request.text(answer)) == (
        "audio_seconds",
        3.438,
        " hello",
    )
    with pytest.raises(ValueError, match="clip"):
        request_of("audio", clip=None)


def test_rerank_and_classify_read_input_tokens() -> None:
    rr = request_of("rerank", input_tokens=40)
    assert rr.json is not None and len(rr.json["documents"]) == rerank.BENCH_DOCUMENTS
    answer = {"usage": {"prompt_tokens": 77}}
    assert rr.units(answer) == classify_units(answer) == 77.0


def classify_units(answer: dict[str, Any]) -> float | None:
    return request_of("classify").units(answer)


def test_usage_readers_take_numbers_only() -> None:
    read = usage_of("prompt_tokens")
    assert read({"usage": {"prompt_tokens": 3}}) == 3.0
    assert read({"usage": {"prompt_tokens": True}}) is None
    assert read({"usage": None}) is read({}) is None


# -- the flow against a mocked server -----------------------------------------------------------


CHUNKS = [
    {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
    {"choices": [{"index": 0, "delta": {"content": "Hi"}}]},
    {"choices": [{"index": 0, "delta": {"content": " there"}}]},
    {"choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 3}},
]


def sse(chunks: list[dict[str, Any]]) -> bytes:
    return b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"


class Server:
    """A laneway's answers, enough for a run: the card, /health, /metrics, and answers of
    an embeddings model (or a streamed chat model's)."""

    def __init__(
        self, *, warm: bool = True, fail_from: int | None = None, capability: str = "embeddings"
    ) -> None:
        self.warm, self.fail_from = warm, fail_from  # the first request that fails (1: all)
        self.capability = capability
        self.posts = 0

    def answer(self) -> httpx.Response:
        if self.capability == "chat":
            failed = [{"error": {"message": "the worker died"}}]
            chunks = failed if self.posts % 2 == 0 else CHUNKS  # every other one fails
            return httpx.Response(200, content=sse(chunks))
        body = {"data": [{"embedding": [0.1, 0.2]}], "usage": {"prompt_tokens": 10}}
        return httpx.Response(200, json=body)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == f"/v1/models/{MODEL}":
            return httpx.Response(200, json={"id": MODEL, "capability": self.capability})
        if path.startswith("/v1/models"):
            if path == "/v1/models":
                return httpx.Response(200, json={"data": [{"id": MODEL}]})
            return httpx.Response(404, json={"error": {"message": "The model does not exist"}})
        if path == "/health":
            entry = {"warm": self.warm, "engines": ["fake"], "devices": ["cpu"]}
            entry |= {"workers": [], "warm_workers": ["w1"] if self.warm else []}
            return httpx.Response(200 if self.warm else 503, json={"models": {MODEL: entry}})
        if path == "/metrics":
            return httpx.Response(200, text=exposition({(MODEL, "w1"): (self.posts, self.posts)}))
        self.posts += 1
        if self.fail_from is not None and self.posts >= self.fail_from:
            return httpx.Response(400, json={"error": {"message": "input too long"}})
        return self.answer()


def run(server: Server, *argv: str) -> tuple[int, str, str]:
    args = parse(MODEL, "--no-store", "--base-url", "http://lw", *argv)
    out, err = io.StringIO(), io.StringIO()
    args.transport, args.out, args.err = httpx.MockTransport(server), out, err
    code = commands.cmd_benchmark(args)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(autouse=True)
def quick_settle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forwards, "SETTLE_S", 0.0)
    monkeypatch.setattr(probe, "HEALTH_POLL_S", 0.01)


def test_a_run_prints_a_row_per_concurrency() -> None:
    server = Server()
    code, out, err = run(server, "--concurrency", "1,3", "--requests", "6")
    assert code == 0, err
    assert server.posts == 13  # the warm-up and 6 per step
    lines = out.splitlines()
    assert lines[0] == (
        f"{MODEL} (embeddings) on fake, device cpu, 1 warm worker(s), context unknown; "
        "10 input tokens a request"
    )
    assert lines[1].split()[:5] == ["CONC", "REQS", "OK", "REQ/S", "TOKENS/S"]
    assert [line.split()[:3] for line in lines[2:4]] == [["1", "6", "100%"], ["3", "6", "100%"]]
    assert lines[-1] == "not stored"
    assert "concurrency 3: 6 requests, 100% ok" in err


def test_json_output() -> None:
    code, out, _ = run(Server(), "--concurrency", "2", "--requests", "4", "--json")
    assert code == 0
    body = json.loads(out)
    assert body["run_id"] is None
    (row,) = body["records"]
    assert (row["concurrency"], row["requests"], row["success_rate"]) == (2, 4, 1.0)
    assert row["units_per_s"] > 0 and row["unit"] == "tokens"
    assert row["batch_size"] is None or math.isfinite(row["batch_size"])


def test_a_stream_measures_ttft_and_completion_tokens_and_its_error_events_fail() -> None:
    server = Server(capability="chat")
    code, out, _ = run(server, "--concurrency", "1", "--requests", "4", "--json")
    assert code == 0
    (row,) = json.loads(out)["records"]
    assert (row["requests"], row["success_rate"]) == (4, 0.5)  # posts 3 and 5 pass
    assert row["ttft_p50_s"] is not None and row["ttft_p50_s"] <= row["latency_p50_s"]
    assert (row["unit"], row["input_tokens"], row["output_tokens"]) == (
        "completion_tokens",
        20.0,
        3.0,
    )
    assert row["units_per_s"] > 0 and row["sample_response"] == "Hi there"


def test_a_duration_runs_each_step_for_that_long() -> None:
    code, out, _ = run(Server(), "--concurrency", "2", "--duration", "0.3", "--json")
    assert code == 0
    (row,) = json.loads(out)["records"]
    assert row["requests"] >= 2 and row["success_rate"] == 1.0


def test_an_unknown_model_exits_2_naming_the_served_ones() -> None:
    args = parse("nope/x", "--no-store", "--base-url", "http://lw")
    err = io.StringIO()
    args.transport, args.out, args.err = httpx.MockTransport(Server()), io.StringIO(), err
    assert commands.cmd_benchmark(args) == 2
    assert "does not serve model 'nope/x'" in err.getvalue()
    assert f"served: {MODEL}" in err.getvalue()


def test_no_warm_worker_exits_3_within_the_timeout() -> None:
    code, _, err = run(Server(warm=False), "--timeout", "0.2")
    assert code == 3
    assert "no warm worker serves model 'me/model' (embeddings) after waiting 0.2s" in err
    assert "laneway worker --capability embeddings" in err


def test_a_failing_warm_up_says_why_and_stores_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(commands, "store", lambda rows: pytest.fail("stored a failed run"))
    code, out, err = run(Server(fail_from=1), "--requests", "2")
    assert code == 1
    assert "the warm-up request failed: HTTP 400: input too long" in err
    assert out == ""


def test_every_request_failing_says_why_and_stores_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(commands, "store", lambda rows: pytest.fail("stored a failed run"))
    args = ("--concurrency", "1,2", "--requests", "3")
    code, out, err = run(Server(fail_from=2), *args)  # the warm-up passes
    assert code == 1
    assert "every request failed; the first: HTTP 400: input too long" in err
    assert out == ""


def test_failures_count_against_the_success_rate() -> None:
    code, out, _ = run(Server(fail_from=4), "--concurrency", "1", "--requests", "4", "--json")
    assert code == 0
    (row,) = json.loads(out)["records"]
    assert (row["requests"], row["success_rate"]) == (4, 0.5)  # posts 2, 3 pass; 4, 5 fail


def test_a_run_is_stored_under_one_run_id(monkeypatch: pytest.MonkeyPatch) -> None:
    stored: list[Any] = []
    monkeypatch.setattr(commands, "prepare_store", lambda: None)
    monkeypatch.setattr(commands, "store", lambda rows: stored.append(rows) or "run_x")
    args = parse(MODEL, "--base-url", "http://lw", "--concurrency", "1,2", "--requests", "2")
    out = io.StringIO()
    args.transport, args.out, args.err = httpx.MockTransport(Server()), out, io.StringIO()
    assert commands.cmd_benchmark(args) == 0
    assert [r.concurrency for r in stored[0]] == [1, 2]
    assert out.getvalue().splitlines()[-1] == "run id: run_x"


def test_an_unreachable_server_exits_1() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    args = parse(MODEL, "--no-store", "--base-url", "http://lw")
    err = io.StringIO()
    args.transport, args.out, args.err = httpx.MockTransport(refuse), io.StringIO(), err
    assert commands.cmd_benchmark(args) == 1
    assert "cannot reach http://lw" in err.getvalue()
