"""What one API process holds: settings, catalog, Redis and the live client."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from api.live import LiveClient
from configs.catalog import Catalog
from configs.settings import Settings


@dataclass
class AppState:
    settings: Settings
    catalog: Catalog
    redis: aioredis.Redis
    live: LiveClient
    started_at: int = field(default_factory=lambda: int(time.time()))
