"""`laneway up | api | worker | workers | migrate | flower`."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from pydantic import ValidationError

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
    from tasks.db import migrate

    migrate()
    log.info("database is at the latest revision")
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    _check_catalog()
    if not args.no_migrate:
        cmd_migrate(args)
    settings = _settings()
    uvicorn.run(
        "api.app:create_app",
        factory=True,
        host=args.host or settings.host,
        port=args.port or settings.port,
        log_level="info",
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from workers.launcher import run_worker

    models = [m.strip() for m in args.models.split(",")] if args.models else None
    run_worker(args.capability, device=args.device, models=models)
    return 0


def cmd_workers(args: argparse.Namespace) -> int:
    from workers.launcher import run_gpu_workers

    return run_gpu_workers(args.capability, args.gpus)


def cmd_flower(args: argparse.Namespace) -> int:
    settings = _settings()
    argv = [
        sys.executable,
        "-m",
        "celery",
        "--broker",
        settings.effective_redis_url,
        "flower",
        f"--port={args.port}",
        f"--address={args.host}",
    ]
    os.execv(sys.executable, argv)
    return 0  # pragma: no cover


class Stack:
    """The child processes of `laneway up`, stopped in order on Ctrl-C or SIGTERM."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.argv: dict[str, list[str]] = {}
        self.stopping = False

    def spawn(self, name: str, argv: list[str]) -> None:
        self.argv[name] = argv
        self.procs[name] = subprocess.Popen(argv, start_new_session=True)
        log.info("started %s (pid %d)", name, self.procs[name].pid)

    def stop(self, *_: object) -> None:
        if self.stopping:
            return
        self.stopping = True
        # API first (no new work), then workers, then Redis
        order = sorted(self.procs, key=lambda n: (n != "api", n == "redis"))
        for name in order:
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop in time; killing it", name)
                    proc.kill()
                    proc.wait()


def cmd_up(args: argparse.Namespace) -> int:
    if args.data_dir:
        os.environ["LANEWAY_DATA_DIR"] = str(Path(args.data_dir).resolve())
    from configs.settings import get_settings

    get_settings.cache_clear()
    capabilities = _check_catalog()
    settings = _settings()
    stack = Stack()
    if not settings.redis_url:
        from laneway.embedded_redis import start_redis

        redis_proc, url = start_redis(settings.data_dir / "redis")
        stack.procs["redis"] = redis_proc
        os.environ["LANEWAY_REDIS_URL"] = url
        log.info("embedded redis-server at %s", url)
    get_settings.cache_clear()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("stopping laneway (signal %d)", signum)
        stack.stop()
        sys.exit(0)

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        cmd_migrate(args)
        me = [sys.executable, "-m", "laneway"]
        for cap in capabilities:
            stack.spawn(
                f"worker-{cap}", [*me, "worker", "--capability", cap, "--device", args.device]
            )
        host = args.host or settings.host
        port = args.port or settings.port
        stack.spawn("api", [*me, "api", "--host", host, "--port", str(port), "--no-migrate"])
        log.info("laneway up: http://%s:%d (Ctrl-C stops everything)", host, port)
        restarts: dict[str, list[float]] = {}
        while True:
            time.sleep(0.5)
            for name, proc in list(stack.procs.items()):
                code = proc.poll()
                if code is None or stack.stopping:
                    continue
                if name.startswith("worker-"):
                    recent = [t for t in restarts.get(name, []) if time.time() - t < 60]
                    if len(recent) >= 5:
                        log.error("%s keeps dying (exit %s); stopping", name, code)
                        stack.stop()
                        return 1
                    restarts[name] = [*recent, time.time()]
                    log.warning("%s exited with %s; restarting it", name, code)
                    stack.spawn(name, stack.argv[name])
                else:
                    log.error("%s exited with %s; stopping the stack", name, code)
                    stack.stop()
                    return 1
    finally:
        stack.stop()


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
    api.set_defaults(func=cmd_api)

    worker = sub.add_parser("worker", help="one worker for one capability on one device")
    worker.add_argument("--capability", required=True)
    worker.add_argument("--device", default="auto", help="auto, cpu or cuda:N")
    worker.add_argument("--models", help="comma list (default: LANEWAY_MODELS)")
    worker.set_defaults(func=cmd_worker)

    workers = sub.add_parser("workers", help="one worker per GPU")
    workers.add_argument("--capability", default="embeddings")
    workers.add_argument("--gpus", default="all", help="all or a comma list of indices")
    workers.set_defaults(func=cmd_workers)

    migrate = sub.add_parser("migrate", help="bring the database to the latest revision")
    migrate.set_defaults(func=cmd_migrate)

    flower = sub.add_parser("flower", help="Celery Flower on the laneway broker")
    flower.add_argument("--host", default="127.0.0.1")
    flower.add_argument("--port", type=int, default=5555)
    flower.set_defaults(func=cmd_flower)
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(
        level=os.environ.get("LANEWAY_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
