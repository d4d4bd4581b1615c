"""The FastAPI application: wiring only; logic lives in api/serving."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api import docs, errors, openapi
from api.auth import KeyRing
from api.limits import RateLimiter
from api.live import LiveClient
from api.middleware import Gate
from api.responses import SafeJSONResponse
from api.routes import batches, benchmarks, files, models, ops
from api.state import AppState
from configs import tracing
from configs.capabilities import REGISTRY
from configs.catalog import load_catalog
from configs.logs import configure as configure_logging
from configs.settings import Settings, get_settings
from tasks.access.keys import load_records
from tasks.queue.redis_client import async_client
from tasks.store.db import get_engine

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    if not logging.getLogger().handlers:  # an API process uvicorn spawned (--workers N)
        configure_logging()
    settings = settings or get_settings()
    tracing.setup("laneway-api")  # only when the OTEL_* variables ask for it
    catalog = load_catalog(settings.model_config_path)
    catalog.served(settings.models)  # fail fast on unknown ids
    keys = KeyRing(settings, load_records)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        get_engine(settings)
        redis = async_client(
            settings.effective_redis_url, socket_timeout=10, health_check_interval=10
        )
        live = LiveClient(settings, redis)
        await live.start()
        app.state.laneway = AppState(settings=settings, catalog=catalog, redis=redis, live=live)
        log.info("laneway API serving %s", ", ".join(settings.models))
        try:
            yield
        finally:
            await keys.close()
            await live.stop()
            await redis.aclose()

    app = FastAPI(
        title="laneway",
        version="0.1.0",
        description="OpenAI-compatible live calls and Batch API on Celery, Redis and SQL.",
        lifespan=lifespan,
        default_response_class=SafeJSONResponse,
        # served by api/docs.py with local assets (FastAPI's load them from a CDN)
        docs_url=None,
        redoc_url=None,
    )
    errors.install(app)
    openapi.install(app, settings)
    docs.install(app)
    capability_routes = [cap.api_module() for cap in REGISTRY.values()]
    app.add_middleware(
        Gate,
        keys=keys,
        limiter=RateLimiter(settings),
        protect_ops=settings.protect_ops,
        max_bytes=settings.max_request_bytes,
        body_limits={
            path: limit
            for module in (*capability_routes, files)
            if hasattr(module, "body_limits")
            for path, limit in module.body_limits(settings).items()
        },
        served_models=settings.models,
        routes=lambda: app.routes,
        direct=[d for m in capability_routes if (d := getattr(m, "DIRECT", None)) is not None],
        state=lambda: app.state.laneway,
    )
    for module in (*capability_routes, models, files, batches, benchmarks, ops):
        app.include_router(module.router)
    return app
