"""/v1/benchmarks objects (laneway's own routes; OpenAI has none): measured speeds of
models, estimates made from them and comparisons. For the OpenAPI document: the routes
pass ``tasks.benchmarks``' objects through."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class BenchmarkRecord(BaseModel):
    """One measured speed: a row of a ``laneway benchmark`` run (one concurrency of its
    sweep) or a rolling record, which a model's workers fold their forwards' rates into."""

    object: Literal["benchmark.record"]
    id: int
    source: Literal["benchmark", "rolling"]
    run_id: str
    model: str
    capability: str
    engine: str
    device: str
    workers: int
    concurrency: int | None
    requests: int
    success_rate: float | None
    requests_per_s: float | None
    units_per_s: float | None
    unit: str | None
    latency_p50_s: float | None
    latency_p95_s: float | None
    ttft_p50_s: float | None
    batch_size: float | None
    context_length: int | None
    input_tokens: float | None
    output_tokens: float | None
    sample_response: str | None
    version: str
    created_at: int
    measured_at: int


class BenchmarkRecordList(BaseModel):
    object: Literal["list"]
    data: list[BenchmarkRecord]


class EstimateBasis(BaseModel):
    """The rate an estimate goes by: the best row of the model's latest benchmark run,
    else its rolling records (times its warm workers)."""

    source: Literal["benchmark", "rolling"]
    requests_per_s: float | None
    units_per_s: float | None
    unit: str | None
    measured_at: int
    record_ids: list[int]


class BenchmarkModel(BaseModel):
    """A model with records: its latest benchmark run's rows, its rolling records, and
    the rate its estimates go by."""

    object: Literal["benchmark.model"]
    id: str
    served: bool
    basis: EstimateBasis | None
    records: list[BenchmarkRecord]


class BenchmarkModelList(BaseModel):
    object: Literal["list"]
    data: list[BenchmarkModel]


class Estimate(BaseModel):
    """Seconds for some lines of a model: ``run_seconds`` for them alone at the model's
    rate, after ``queued_ahead_seconds`` for the lines of active batches before them.
    The seconds are null when the model has no usable record."""

    object: Literal["benchmark.estimate"]
    model: str
    lines: int
    input_tokens: float | None
    output_tokens: float | None
    queued_ahead_lines: int
    queued_ahead_seconds: float | None
    run_seconds: float | None
    seconds: float | None
    basis: EstimateBasis | None
