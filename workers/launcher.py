"""Start a worker: load and warm models, then take `<capability>.live` with the live
consumer (workers/live.py) and `<capability>.batch` hints with Celery's own consumer."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any

from celery.signals import worker_shutdown
from celery.worker.control import Panel, inspect_command
from kombu import Exchange, Queue

from configs.capabilities import CAPABILITIES
from configs.catalog import CatalogError, load_catalog
from configs.settings import Settings, get_settings
from tasks.celery_app import get_celery
from tasks.names import BATCH, LIVE, queue_name
from workers import tasks as task_bodies
from workers.runtime import WorkerRuntime

log = logging.getLogger(__name__)


def pin_device(device: str) -> str:
    """Validate the device and make it the process's current one (one process per GPU)."""
    import torch

    if device == "auto":
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if not device.startswith("cuda"):
        raise SystemExit(f"--device must be cpu or cuda:N, not {device!r}")
    if not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: CUDA is not available on this machine")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise SystemExit(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")
    torch.cuda.set_device(index)
    return f"cuda:{index}"


def run_worker(
    capability: str,
    *,
    device: str = "cpu",
    models: Sequence[str] | None = None,
    settings: Settings | None = None,
) -> None:
    settings = settings or get_settings()
    if capability not in CAPABILITIES:
        raise SystemExit(f"unknown capability {capability!r}; known: {', '.join(CAPABILITIES)}")
    catalog = load_catalog(settings.model_config_path)
    try:
        entries = [
            e for e in catalog.served(list(models or settings.models)) if e.capability == capability
        ]
    except CatalogError as exc:
        raise SystemExit(str(exc)) from None
    if not entries:
        raise SystemExit(f"none of the served models has capability {capability!r}")
    device = pin_device(device)
    runtime = WorkerRuntime(settings, capability=capability, device=device, entries=entries)
    runner = task_bodies.make_batch_runner(runtime)
    app = get_celery()
    task_bodies.register(app, runtime, runner)
    runtime.start()
    live = task_bodies.make_live_consumer(runtime, app)
    live.start()
    report_live_queue(queue_name(capability, LIVE))
    runner.start()
    stop_reaper = threading.Event()
    task_bodies.start_reaper(runtime, runner, stop_reaper)

    @worker_shutdown.connect(weak=False)
    def _withdraw(**_: object) -> None:
        live.stop()  # answer what it holds before the models go
        stop_reaper.set()
        runner.stop()
        runtime.stop()

    # one log line per task costs more than the task on the live path
    for noisy in ("celery.app.trace", "celery.worker.strategy"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    worker = app.Worker(
        hostname=runtime.worker_id,
        queues=[queue_name(capability, BATCH)],
        pool="threads",
        concurrency=settings.worker_concurrency,
        prefetch_multiplier=1,
        without_gossip=True,
        without_mingle=True,
        loglevel="INFO",
    )
    worker.start()
    sys.exit(worker.exitcode or 0)


def report_live_queue(name: str) -> None:
    """Celery's consumer does not take the live queue, so `inspect active_queues` (what
    Flower lists queues and their lengths from) would leave it out: report it too."""
    celery_own = Panel.data["active_queues"]
    live = dict(Queue(name, Exchange(name), routing_key=name).as_dict(recurse=True))

    @inspect_command(name="active_queues")
    def active_queues(state: Any) -> list[dict[str, Any]]:
        """List the task queues a worker is currently consuming from."""
        return [*celery_own(state), live]


def run_gpu_workers(capability: str, gpus: str) -> int:
    """One worker process per GPU (`--gpus all` or `0,2`); returns when all have exited."""
    import torch

    count = torch.cuda.device_count()
    indices = list(range(count)) if gpus == "all" else [int(g) for g in gpus.split(",") if g]
    if not indices:
        raise SystemExit("no GPUs found; use `laneway worker --device cpu`")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "laneway.cli",
                "worker",
                "--capability",
                capability,
                "--device",
                f"cuda:{i}",
            ]
        )
        for i in indices
    ]
    codes = [p.wait() for p in procs]
    return max(codes, default=0)
