"""Before the sweep: is the model served, by what, and is a worker warm for it?

``/v1/models/{model}`` says whether the server knows the model (an unknown one ends the
run at once) and its capability and context; ``/health`` says which engines, devices and
workers serve it. A model nobody serves warm is waited for up to ``--timeout`` (a worker
may be loading it) and then named with the command that would serve it, so a benchmark
never hangs on requests that sit in a queue no worker reads.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from laneway.benchmark_cli.load import error_message

HEALTH_POLL_S = 0.5
UNKNOWN = "unknown"
# the records' engine and device columns
MAX_LABEL_CHARS = 64


class BenchmarkError(Exception):
    """The run cannot go on (the message says why); ``code`` is the exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


EXIT_FAILED, EXIT_USAGE, EXIT_NO_WORKER = 1, 2, 3


@dataclass(frozen=True)
class Target:
    """What the sweep measures: a served model, and what serves it."""

    model: str  # the catalog id (an alias resolved, where it could be)
    capability: str
    engine: str
    device: str
    workers: int
    context_length: int | None


async def get_json(client: httpx.AsyncClient, path: str, ok: tuple[int, ...] = (200,)) -> Any:
    """GET ``path``'s JSON; an answer outside ``ok`` (or none) ends the run."""
    try:
        response = await client.get(path)
    except httpx.HTTPError as exc:
        raise BenchmarkError(f"cannot reach {client.base_url}: {exc}", EXIT_FAILED) from exc
    if response.status_code == 404 and path.startswith("/v1/models/"):
        raise BenchmarkError(error_message(response), EXIT_USAGE)
    if response.status_code not in ok:
        raise BenchmarkError(f"GET {path}: {error_message(response)}", EXIT_FAILED)
    try:
        return response.json()
    except ValueError:
        raise BenchmarkError(f"GET {path}: the answer is not JSON", EXIT_FAILED) from None


async def model_card(client: httpx.AsyncClient, model: str) -> dict[str, Any]:
    """The server's card of ``model``: unknown, exit 2 with the models it does serve."""
    try:
        card = await get_json(client, f"/v1/models/{quote(model, safe='/')}")
    except BenchmarkError as exc:
        if exc.code != EXIT_USAGE:
            raise
        listing = await get_json(client, "/v1/models")
        served = ", ".join(str(m.get("id")) for m in listing.get("data") or [])
        raise BenchmarkError(
            f"the server does not serve model {model!r} ({exc}); served: {served or 'none'}",
            EXIT_USAGE,
        ) from None
    if not isinstance(card, dict) or not isinstance(card.get("capability"), str):
        raise BenchmarkError(f"the server's card of {model!r} names no capability", EXIT_FAILED)
    return card


def _health_entry(health: Any, model: str, catalog_id: str | None) -> dict[str, Any] | None:
    models = health.get("models") if isinstance(health, dict) else None
    if not isinstance(models, dict):
        return None
    entry = models.get(model, models.get(catalog_id or ""))
    return entry if isinstance(entry, dict) else None


def catalog_id(model: str) -> str | None:
    """``model``'s catalog id by the local catalog, for an alias (``/health`` lists served
    models by id); None when the local settings cannot tell (a remote server's catalog
    may differ: then the alias is what the records say)."""
    try:
        from configs.catalog import load_catalog
        from configs.settings import get_settings

        entry = load_catalog(get_settings().model_config_path).find(model)
    except Exception:  # no local catalog or settings: nothing to resolve by
        return None
    return entry.id if entry is not None else None


def _not_warm(model: str, capability: str, entry: dict[str, Any] | None, waited: float) -> str:
    loading = entry.get("workers") if entry else None
    if isinstance(loading, list) and loading:
        return (
            f"model {model!r} is still loading on {len(loading)} worker(s) after {waited:g}s; "
            "wait for it, or give it longer with --timeout"
        )
    return (
        f"no warm worker serves model {model!r} ({capability}) after waiting {waited:g}s: "
        f"start one with `laneway worker --capability {capability}` (with the model in "
        "LANEWAY_MODELS or --models), or `laneway up`"
    )


async def wait_warm(
    client: httpx.AsyncClient, model: str, capability: str, alias_of: str | None, timeout: float
) -> dict[str, Any]:
    """``model``'s ``/health`` entry once a worker has it warm (``/health`` answers 503
    while any served model is cold: its body still says which)."""
    deadline = time.monotonic() + timeout
    while True:
        health = await get_json(client, "/health", ok=(200, 503))
        entry = _health_entry(health, model, alias_of)
        if entry is not None and entry.get("warm"):
            return entry
        if time.monotonic() >= deadline:
            raise BenchmarkError(_not_warm(model, capability, entry, timeout), EXIT_NO_WORKER)
        await asyncio.sleep(HEALTH_POLL_S)


def _label(values: Any) -> str:
    """A list of engines or devices as one column value."""
    if not isinstance(values, list) or not values:
        return UNKNOWN
    return ",".join(str(v) for v in values)[:MAX_LABEL_CHARS]


async def probe(client: httpx.AsyncClient, model: str, timeout: float) -> Target:
    """The target of the sweep, once a worker serves ``model`` warm."""
    card = await model_card(client, model)
    capability = str(card["capability"])
    resolved = catalog_id(model)
    entry = await wait_warm(client, model, capability, resolved, timeout)
    warm = entry.get("warm_workers")
    context = card.get("max_input_tokens")
    return Target(
        model=resolved or model,
        capability=capability,
        engine=_label(entry.get("engines")),
        device=_label(entry.get("devices")),
        # without the detail (an API key that /health does not see): one, at least
        workers=len(warm) if isinstance(warm, list) else 1,
        context_length=context if isinstance(context, int) else None,
    )
