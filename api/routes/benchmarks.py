"""/v1/benchmarks: measured speeds (``laneway benchmark`` runs and workers' rolling
records), estimates and comparisons. Read-only, behind the same keys as the rest:
records are an operator's to make, with the CLI."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from api.deps import OwnerDep, StateDep
from api.protocol.benchmarks import (
    BenchmarkModelList,
    BenchmarkRecordList,
    Estimate,
)
from api.protocol.errors import error_responses
from api.serving import benchmarks as serving
from tasks.benchmarks.service import Shape
from tasks.errors import InvalidRequest

router = APIRouter()

# models one comparison may name
MAX_COMPARE = 10
# what an estimate may ask about: bounds that no batch reaches, so that a bad number is a 400
MAX_LINES = 10_000_000
MAX_TOKENS = 10_000_000.0

Size = Annotated[float | None, Query(ge=0, le=MAX_TOKENS, allow_inf_nan=False)]


@router.get(
    "/v1/benchmarks/models",
    response_model=None,
    responses={200: {"model": BenchmarkModelList}, **error_responses(401, 429)},
)
async def list_models(state: StateDep) -> Any:
    workers = await state.live.registry.warm_counts()
    return await run_in_threadpool(serving.models, state.settings.models, workers)


@router.get(
    "/v1/benchmarks/models/{model_id:path}",
    response_model=None,
    responses={200: {"model": BenchmarkRecordList}, **error_responses(400, 401, 404, 429)},
)
async def model_records(
    model_id: str, state: StateDep, limit: Annotated[int, Query(ge=1, le=100)] = 20
) -> Any:
    """The model's records, newest first."""
    model = await _known(state, model_id)
    return await run_in_threadpool(serving.model_records, model, limit)


@router.get(
    "/v1/benchmarks/estimate",
    response_model=None,
    responses={200: {"model": Estimate}, **error_responses(400, 401, 404, 429)},
)
async def estimate(
    state: StateDep,
    owner: OwnerDep,
    model: str | None = None,
    lines: Annotated[int | None, Query(ge=1, le=MAX_LINES)] = None,
    input_tokens: Size = None,
    output_tokens: Size = None,
    input_file_id: Annotated[str | None, Query(max_length=64)] = None,
) -> Any:
    """Seconds to run some lines, after the work queued ahead: from a model, a line count
    and mean lengths (tokens in; tokens out for chat), or from an uploaded batch input
    file (the model, lines and lengths are read from it)."""
    workers = await state.live.registry.warm_counts()
    if input_file_id is not None:
        if model is not None or lines is not None:
            raise InvalidRequest(
                "give either input_file_id or model and lines, not both", param="input_file_id"
            )
        return await run_in_threadpool(
            serving.estimate_file, state.settings, state.catalog, input_file_id, owner, workers
        )
    if model is None or lines is None:
        raise InvalidRequest(
            "an estimate needs model and lines, or input_file_id",
            param="model" if model is None else "lines",
        )
    shape = Shape(await _known(state, model), lines, input_tokens, output_tokens)
    return await run_in_threadpool(serving.estimate_lines, shape, workers)


@router.get(
    "/v1/benchmarks/compare",
    response_model=None,
    responses={200: {"model": BenchmarkModelList}, **error_responses(400, 401, 404, 429)},
)
async def compare(
    state: StateDep, models: Annotated[str, Query(min_length=1, max_length=4096)]
) -> Any:
    """The named models (a comma list, at most ``MAX_COMPARE``) side by side."""
    names = list(dict.fromkeys(n.strip() for n in models.split(",") if n.strip()))
    if not names:
        raise InvalidRequest("'models' names no model", param="models")
    if len(names) > MAX_COMPARE:
        raise InvalidRequest(
            f"'models' names {len(names)} models; at most {MAX_COMPARE} may be compared",
            param="models",
        )
    known = [await _known(state, name) for name in names]
    workers = await state.live.registry.warm_counts()
    return await run_in_threadpool(serving.compare, known, state.settings.models, workers)


async def _known(state: StateDep, model: str) -> str:
    return await run_in_threadpool(serving.known_model, state.catalog, state.settings.models, model)
