"""Start a worker: load and warm models, then take `<capability>.live` with the live
consumer (workers/live.py) and `<capability>.batch` hints with Celery's own consumer."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any

from celery.signals import worker_shutdown
from celery.worker.control import Panel, inspect_command
from kombu import Exchange, Queue

from configs import tracing
from configs.capabilities import CAPABILITIES
from configs.catalog import CatalogEntry, CatalogError, load_catalog
from configs.settings import Settings, get_settings
from tasks.queue.celery_app import get_celery
from tasks.queue.names import BATCH, LIVE, queue_name
from workers import placement
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
    tracing.setup(f"laneway-worker-{capability}")  # only when the OTEL_* variables ask for it
    entries = capability_entries(capability, models, settings)
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


def run_gpu_workers(
    capability: str,
    gpus: str,
    models: Sequence[str] | None = None,
    *,
    headroom_mb: int = placement.DEFAULT_HEADROOM_MB,
    settings: Settings | None = None,
) -> int:
    """One worker process per GPU (`--gpus all` or `0,2`), each serving the models that
    `workers.placement` puts on it; returns when all have exited."""
    settings = settings or get_settings()
    entries = capability_entries(capability, models, settings)
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        log.warning("CUDA_VISIBLE_DEVICES is ignored here: --gpus picks nvidia-smi's indices")
    found = placement.inventory(placement.parse_gpus(gpus))
    try:
        result = placement.complete(
            placement.plan(entries, found, headroom_mb=headroom_mb), entries
        )
    except placement.PlacementError as exc:
        raise SystemExit(f"laneway workers --capability {capability}: {exc}") from None
    for line in describe_plan(result, found):
        print(line, flush=True)
    procs = []
    for index, ids in result.assignments.items():
        argv, env = gpu_worker_command(capability, index, ids)
        procs.append(subprocess.Popen(argv, env=env))
    codes = [p.wait() for p in procs]
    return max(codes, default=0)


def capability_entries(
    capability: str, models: Sequence[str] | None, settings: Settings
) -> list[CatalogEntry]:
    """The served models of ``capability``: ``models`` (each must have it), else those of
    LANEWAY_MODELS that have it."""
    if capability not in CAPABILITIES:
        raise SystemExit(f"unknown capability {capability!r}; known: {', '.join(CAPABILITIES)}")
    try:
        entries = load_catalog(settings.model_config_path).served(list(models or settings.models))
    except CatalogError as exc:
        raise SystemExit(str(exc)) from None
    if models:
        other = [f"{e.id} ({e.capability})" for e in entries if e.capability != capability]
        if other:
            raise SystemExit(f"--models names models of another capability: {', '.join(other)}")
    entries = [e for e in entries if e.capability == capability]
    if not entries:
        raise SystemExit(f"none of the served models has capability {capability!r}")
    return entries


def describe_plan(result: placement.Plan, gpus: Sequence[placement.Gpu]) -> list[str]:
    """One line per GPU: index, name, free MB, what it serves (or that it gets no worker)."""
    lines = []
    for gpu in gpus:
        ids = result.assignments.get(gpu.index)
        what = (
            f"{', '.join(ids)} ({result.left_mb[gpu.index]} MB left)"
            if ids
            else "no worker (cannot hold every model)"
        )
        lines.append(f"GPU {gpu.index} ({gpu.name}, {gpu.free_mb} MB free): {what}")
    return lines


def gpu_worker_command(
    capability: str, index: int, models: Sequence[str]
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment of the worker for GPU ``index``: it sees that GPU alone, as
    cuda:0, and its name (`audio-gpu1`) is in its argv (`ps`) and LANEWAY_WORKER_NAME."""
    name = f"{capability}-gpu{index}"
    argv = [
        sys.executable,
        "-X",  # CPython keeps unknown -X options in sys._xoptions: a name that ps shows
        f"laneway_worker={name}",
        "-m",
        "laneway.cli",
        "worker",
        "--capability",
        capability,
        "--device",
        "cuda:0",
        "--models",
        ",".join(models),
    ]
    env = {
        **os.environ,
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",  # the indices NVML and nvidia-smi use
        "CUDA_VISIBLE_DEVICES": str(index),
        "LANEWAY_WORKER_NAME": name,
    }
    return argv, env
