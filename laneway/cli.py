"""`laneway up | api | worker | workers | migrate | flower | batch | keys | benchmark`."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from pydantic import ValidationError

from configs.capabilities import CAPABILITIES
from configs.logs import configure as configure_logging
from laneway.argtypes import whole
from laneway.batch_cli import add_parser as add_batch_parser
from laneway.benchmark_cli import add_parser as add_benchmark_parser
from laneway.embedded_redis import redact_url
from laneway.keys_cli import add_parser as add_keys_parser
from laneway.stack import Processes

if TYPE_CHECKING:
    from configs.settings import Settings

log = logging.getLogger("laneway")


def _settings():  # type: ignore[no-untyped-def]
    from configs.settings import get_settings

    try:
        return get_settings()
    except ValidationError as exc:
        raise SystemExit(f"invalid laneway settings:\n{exc}") from None


def _check_catalog() -> list[str]:
    """Fail fast, naming the catalog ids, when LANEWAY_MODELS is wrong; returns capabilities."""
    from configs.catalog import CatalogError, load_catalog

    settings = _settings()
    try:
        catalog = load_catalog(settings.model_config_path)
        entries = catalog.served(settings.models)
    except CatalogError as exc:
        raise SystemExit(f"laneway: {exc}") from None
    return sorted({e.capability for e in entries})


def cmd_migrate(_: argparse.Namespace) -> int:
    from tasks.store.db import migrate

    migrate()
    log.info("database is at the latest revision")
    return 0


def default_api_workers(cpus: int | None = None) -> int:
    """`laneway up`'s API processes: one per four cores, at most four (on a small machine
    the model worker needs the cores more than a second API process would)."""
    return max(1, min(4, (cpus or os.cpu_count() or 1) // 4))


def is_loopback(host: str) -> bool:
    """Whether an API bound to ``host`` is reachable from this machine only: 127.0.0.0/8,
    ::1 or localhost. Anything else (0.0.0.0 and ::, which are every interface, another
    address, a host name, which may resolve to any) may be reached from elsewhere."""
    name = host.strip().strip("[]").rstrip(".").lower()
    if name == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _stored_keys() -> bool:
    from tasks.access.keys import load_records

    return bool(load_records())


OPEN_API_HOW = (
    "Set LANEWAY_API_KEY (or LANEWAY_API_KEYS, or create one with `laneway keys create`), "
    "listen on 127.0.0.1 (--host, LANEWAY_HOST), or set LANEWAY_ALLOW_OPEN_API=true to "
    "serve it without a key on purpose"
)


def open_api_problem(
    host: str, settings: Settings, stored_keys: Callable[[], bool] | None = None
) -> str | None:
    """Why an API on ``host`` would be open to others (None: it is not): it listens beyond
    loopback and no key is set anywhere (a key in the database, revoked included, closes
    the API, see api/auth.py). ``stored_keys``: whether the database holds any key."""
    if is_loopback(host) or settings.api_key or settings.api_keys:
        return None
    try:
        if (stored_keys or _stored_keys)():
            return None
    except Exception as exc:  # no answer is no proof of a key
        said = (str(exc).splitlines() or [""])[0][:200]
        return (
            f"the API would listen on {host!r}, beyond this machine, and with no key set "
            f"the database's keys could not be read ({type(exc).__name__}: {said})"
        )
    return (
        f"the API would listen on {host!r}, beyond this machine, with no API key: anyone "
        "who reaches it could use it"
    )


def guard_open_api(host: str, settings: Settings) -> None:
    """Refuse to serve an API open to others, unless LANEWAY_ALLOW_OPEN_API says so."""
    problem = open_api_problem(host, settings)
    if problem is None:
        return
    if not settings.allow_open_api:
        raise SystemExit(f"laneway: refusing to start: {problem}. {OPEN_API_HOW}.")
    log.warning("WARNING: LANEWAY_ALLOW_OPEN_API is set: %s", problem)


def cmd_api(args: argparse.Namespace) -> int:
    _check_catalog()
    if not args.no_migrate:
        cmd_migrate(args)
    settings = _settings()
    guard_open_api(args.host or settings.host, settings)
    workers = args.workers or settings.api_workers or 1
    metrics_dir = None
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # where the processes keep their Prometheus counters, for /metrics to add up
        metrics_dir = tempfile.mkdtemp(prefix="laneway-api-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        _serve(args, settings, workers)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def _serve(args: argparse.Namespace, settings: Settings, workers: int) -> None:
    import uvicorn

    uvicorn.run(
        "api.app:create_app",
        factory=True,
        host=args.host or settings.host,
        port=args.port or settings.port,
        workers=workers,
        # uvloop and httptools when installed (uvicorn[standard] brings both)
        loop="auto",
        http="auto",
        log_level="info",
        access_log=False,
        timeout_graceful_shutdown=10,
        # behind a proxy that strips a path prefix: the prefix (the gate and the router
        # both decide on the path less it, see api/middleware.py)
        root_path=args.root_path or settings.root_path,
    )


def cmd_worker(args: argparse.Namespace) -> int:
    from workers.launcher import run_worker

    models = [m.strip() for m in args.models.split(",")] if args.models else None
    run_worker(args.capability, device=args.device, models=models)
    return 0


def cmd_workers(args: argparse.Namespace) -> int:
    from workers.launcher import run_gpu_workers

    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    headroom = {} if args.headroom_mb is None else {"headroom_mb": args.headroom_mb}
    return run_gpu_workers(args.capability, args.gpus, models, **headroom)


# Flower forgets a worker this long after it went offline: a restarted worker comes back
# under a new name (its pid is in it), so without this the dead ones pile up on the page
FLOWER_PURGE_OFFLINE_S = 3600


def flower_command(
    settings: Settings, host: str, port: int, environ: Mapping[str, str]
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment `laneway flower` runs Flower with.

    Only the broker URL is needed for the queues: on Redis, Flower reads their lengths
    (``/api/queues/length``) itself; ``--broker-api`` is for RabbitMQ's management API. The
    queue names come from the workers' ``active_queues``, which laneway's workers answer
    with both lanes (see ``workers/launcher.py``). Secrets go in the environment, never in
    argv, where ``ps`` shows them to every local user: the broker URL, which may hold
    Redis's password, as ``CELERY_BROKER_URL`` (Celery's app reads it; ``BROKER_URL``, which
    the ``celery`` command would take as ``--broker`` over it, is dropped), and the basic
    auth as ``FLOWER_BASIC_AUTH`` (Flower reads it).
    """
    argv = [
        sys.executable,
        "-m",
        "celery",
        "flower",
        f"--port={port}",
        f"--address={host}",
        f"--purge_offline_workers={FLOWER_PURGE_OFFLINE_S}",
    ]
    env = dict(environ)
    env.pop("BROKER_URL", None)
    env["CELERY_BROKER_URL"] = settings.effective_redis_url
    if settings.flower_basic_auth:
        env["FLOWER_BASIC_AUTH"] = settings.flower_basic_auth
    return argv, env


def cmd_flower(args: argparse.Namespace) -> int:
    argv, env = flower_command(_settings(), args.host, args.port, os.environ)
    os.execve(sys.executable, argv, env)
    return 0  # pragma: no cover


def _supervise(procs: Processes) -> int:
    """Restart a worker that dies (at most 5 times a minute); stop everything when the
    API or Redis dies. Returns the exit code of `laneway up`."""
    restarts: dict[str, list[float]] = {}
    while True:
        time.sleep(0.5)
        for name, proc in list(procs.procs.items()):
            code = proc.popen.poll()
            if code is None:
                continue
            if not name.startswith("worker-"):
                log.error("%s exited with %s; stopping the stack", name, code)
                return 1
            recent = [t for t in restarts.get(name, []) if time.time() - t < 60]
            if len(recent) >= 5:
                log.error("%s keeps dying (exit %s); stopping", name, code)
                return 1
            restarts[name] = [*recent, time.time()]
            log.warning("%s exited with %s; restarting it", name, code)
            procs.spawn(name, proc.argv, proc.env_overrides)


def cmd_up(args: argparse.Namespace) -> int:
    if args.data_dir:
        os.environ["LANEWAY_DATA_DIR"] = str(Path(args.data_dir).resolve())
    from configs.settings import get_settings

    get_settings.cache_clear()
    capabilities = _check_catalog()
    settings = _settings()
    procs = Processes(os.environ)
    stopping = False

    def stop() -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            procs.stop_all()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("stopping laneway (signal %d)", signum)
        stop()
        sys.exit(0)

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        if not settings.redis_url:
            _, url = procs.redis(settings.data_dir / "redis")
            os.environ["LANEWAY_REDIS_URL"] = procs.env["LANEWAY_REDIS_URL"] = url
            log.info("embedded redis-server at %s", redact_url(url))
        get_settings.cache_clear()
        cmd_migrate(args)
        guard_open_api(args.host or settings.host, settings)  # before any worker starts
        for cap in capabilities:
            procs.worker(cap, device=args.device)
        host = args.host or settings.host
        port = args.port or settings.port
        procs.api(host=host, port=port, workers=settings.api_workers or default_api_workers())
        log.info("laneway up: http://%s:%d (Ctrl-C stops everything)", host, port)
        return _supervise(procs)
    finally:
        stop()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="laneway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="the whole stack on this machine")
    up.add_argument("--host")
    up.add_argument("--port", type=int)
    up.add_argument("--data-dir")
    up.add_argument("--device", default="auto", help="auto, cpu or cuda:N for the workers")
    up.set_defaults(func=cmd_up)

    api = sub.add_parser("api", help="the HTTP API")
    api.add_argument("--host")
    api.add_argument("--port", type=int)
    api.add_argument("--no-migrate", action="store_true")
    api.add_argument(
        "--root-path",
        help="the path prefix a reverse proxy strips, e.g. /lw (default: LANEWAY_ROOT_PATH)",
    )
    api.add_argument(
        "--workers",
        type=whole(1, 64),
        help="API processes, 1 to 64 (default: LANEWAY_API_WORKERS, else 1)",
    )
    api.set_defaults(func=cmd_api)

    worker = sub.add_parser("worker", help="one worker for one capability on one device")
    worker.add_argument("--capability", required=True)
    worker.add_argument("--device", default="auto", help="auto, cpu or cuda:N")
    worker.add_argument("--models", help="comma list (default: LANEWAY_MODELS)")
    worker.set_defaults(func=cmd_worker)

    workers = sub.add_parser("workers", help="one worker per GPU")
    workers.add_argument("--capability", default=CAPABILITIES[0])  # the registry's first
    workers.add_argument(
        "--gpus", default="all", help="all or a comma list of indices (nvidia-smi's)"
    )
    workers.add_argument("--models", help="comma list (default: LANEWAY_MODELS of the capability)")
    workers.add_argument(
        "--headroom-mb",
        type=int,
        help="MB each GPU keeps back beyond the models' memory_mb (default 1024)",
    )
    workers.set_defaults(func=cmd_workers)

    migrate = sub.add_parser("migrate", help="bring the database to the latest revision")
    migrate.set_defaults(func=cmd_migrate)

    flower = sub.add_parser("flower", help="Celery Flower on the laneway broker")
    flower.add_argument("--host", default="127.0.0.1")
    flower.add_argument("--port", type=int, default=5555)
    flower.set_defaults(func=cmd_flower)

    add_batch_parser(sub)  # `laneway batch submit|status|list|cancel|download`
    add_keys_parser(sub)  # `laneway keys create|list|revoke`
    add_benchmark_parser(sub)  # `laneway benchmark MODEL`
    return parser


def main(argv: list[str] | None = None) -> None:
    configure_logging()  # LANEWAY_LOG_LEVEL, LANEWAY_LOG_FORMAT (configs/logs.py)
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
