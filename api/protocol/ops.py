"""/health and /metrics, for the OpenAPI document."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class ModelHealth(BaseModel):
    warm: bool
    # what its live workers run it on: engines (``vllm``, a backend's class) and devices
    engines: list[str] = []
    devices: list[str] = []
    # which workers (host and pid): only for a caller the API key lets through
    workers: list[str] | None = None
    warm_workers: list[str] | None = None


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    broker: str
    models: dict[str, ModelHealth]


HEALTH_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {"model": Health, "description": "Every served model is warm"},
    503: {"model": Health, "description": "Some model is not warm, or Redis is unreachable"},
}
METRICS_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {
        "description": "Prometheus text exposition",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    },
}
