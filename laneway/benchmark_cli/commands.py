"""`laneway benchmark MODEL`: the parser, the run's client, what it prints and stores.

It speaks plain HTTP (httpx) to a running laneway, as a client would: ``--base-url``
(else ``LANEWAY_BASE_URL``, else http://127.0.0.1:8000) and ``--api-key`` (else
``OPENAI_API_KEY``, else ``LANEWAY_API_KEY``). The records go straight into the database
the laneway settings name (``LANEWAY_DATABASE_URL``, else SQLite in the data dir), as
`laneway keys` writes keys: the REST API only reads them (``/v1/benchmarks``).

Exit codes: 0 the run was measured (and stored, unless ``--no-store``); 1 the server could
not be reached or answered an error, the warm-up or every request failed, or the records
could not be stored; 2 bad usage or a model the server does not serve; 3 no warm worker
serves the model within ``--timeout``; 130 interrupted (nothing stored).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import httpx

from laneway.argtypes import above, whole
from laneway.batch_cli.client import DEFAULT_BASE_URL, base_url
from laneway.benchmark_cli import report
from laneway.benchmark_cli.probe import EXIT_FAILED, BenchmarkError
from laneway.benchmark_cli.sweep import (
    DEFAULT_INPUT_TOKENS,
    DEFAULT_OUTPUT_TOKENS,
    Plan,
    Run,
    sweep,
)
from tasks.benchmarks.records import Measured

EXIT_OK, EXIT_INTERRUPTED = 0, 130
DEFAULT_CONCURRENCY = "1,4,16"
MAX_CONCURRENCY = 1024
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_REQUEST_TIMEOUT_S = 300.0
DESCRIPTION = """\
Measure a served model through the API, as a client would: one warm-up request, then
one step per --concurrency, each of --requests requests (or --duration seconds). A record
per step (requests/s, tokens or seconds of speech per second, p50/p95 latency, TTFT for a
stream, requests per forward pass, success rate, a sample answer, engine, device and
workers from /health) goes into the database the laneway settings name
(LANEWAY_DATABASE_URL, else SQLite in LANEWAY_DATA_DIR); /v1/benchmarks shows them.

exit codes: 0 measured (and stored); 1 unreachable, an error answer, the warm-up or every
request failed, or not stored; 2 bad usage or a model the server does not serve; 3 no
warm worker for the model within --timeout; 130 interrupted."""


@dataclass(frozen=True)
class Connection:
    """How the run reaches the server."""

    url: str
    api_key: str | None
    request_timeout_s: float
    transport: httpx.AsyncBaseTransport | None = None


def concurrency_list(text: str) -> tuple[int, ...]:
    """``1,4,16``: each 1..MAX_CONCURRENCY, in the order given, repeats dropped."""
    parse = whole(1, MAX_CONCURRENCY)
    values = [parse(part.strip()) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError("name at least one concurrency, e.g. 1,4,16")
    return tuple(dict.fromkeys(values))


def plan_of(args: argparse.Namespace) -> Plan:
    """What the run sends, apart from how it reaches the server (``connection_of``)."""
    return Plan(
        model=args.model,
        concurrency=args.concurrency,
        requests=args.requests,
        duration_s=args.duration,
        input_tokens=args.input_tokens,
        output_tokens=args.output_tokens,
        clip=Path(args.clip) if args.clip else None,
        timeout_s=args.timeout,
    )


def connection_of(args: argparse.Namespace) -> Connection:
    """The server and key as the batch CLI finds them; LANEWAY_API_KEY last, because the
    benchmark often runs beside the stack, with its settings in the environment."""
    key = args.api_key or os.environ.get("OPENAI_API_KEY") or os.environ.get("LANEWAY_API_KEY")
    return Connection(
        url=base_url(args.base_url, os.environ),
        api_key=key or None,
        request_timeout_s=args.request_timeout,
        transport=getattr(args, "transport", None),
    )


def http_client(connection: Connection, concurrency: int) -> httpx.AsyncClient:
    """One client for the run, its pool as large as the largest step (every client of a
    step holds a connection, none waits for one)."""
    headers = {"Authorization": f"Bearer {connection.api_key}"} if connection.api_key else {}
    return httpx.AsyncClient(
        base_url=connection.url,
        headers=headers,
        transport=connection.transport,
        timeout=httpx.Timeout(connection.request_timeout_s, connect=10.0),
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
    )


async def measure(plan: Plan, connection: Connection, err: TextIO) -> Run:
    """The sweep, with a progress line per step on ``err`` (stdout keeps the result)."""
    async with http_client(connection, max(plan.concurrency)) as client:
        return await sweep(client, plan, lambda row: print(report.step_line(row), file=err))


def prepare_store() -> None:
    """Bring the database to the latest revision (as `laneway keys` does) before the run:
    a database that cannot take the records fails the run before it spends minutes."""
    logging.getLogger("alembic").setLevel(logging.WARNING)  # not a migration's story
    from tasks.store.db import migrate

    try:
        migrate()
    except Exception as exc:  # any failure of the settings, the driver or the database
        raise BenchmarkError(
            f"cannot use the database for the records: {exc}", EXIT_FAILED
        ) from exc


def store(rows: Sequence[Measured]) -> str:
    """The records in the database; the run id."""
    from tasks.benchmarks.records import add_run
    from tasks.store.db import session_scope

    with session_scope() as session:
        return add_run(session, rows)


def publish(run: Run, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Store the run (unless ``--no-store``) and print it."""
    run_id: str | None = None
    code = EXIT_OK
    if not args.no_store:
        try:
            run_id = store(run.rows)
        except Exception as exc:  # the measurement stands; say why it was not kept
            print(f"laneway benchmark: could not store the records: {exc}", file=err)
            code = EXIT_FAILED
    if args.json:
        print(report.as_json(run.rows, run_id), file=out)
        return code
    print(report.header(run.target, run.rows), file=out)
    print(report.table(run.rows), file=out)
    print(f"run id: {run_id}" if run_id else "not stored", file=out)
    return code


def cmd_benchmark(args: argparse.Namespace) -> int:
    """Run the sweep and turn its failures into exit codes and one clear message."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # no log line per request
    out: TextIO = getattr(args, "out", None) or sys.stdout
    err: TextIO = getattr(args, "err", None) or sys.stderr
    try:
        if not args.no_store:
            prepare_store()
        run = asyncio.run(measure(plan_of(args), connection_of(args), err))
    except BenchmarkError as exc:
        print(f"laneway benchmark: {exc}", file=err)
        return exc.code
    except KeyboardInterrupt:
        print("\ninterrupted; nothing stored", file=err)
        return EXIT_INTERRUPTED
    return publish(run, args, out, err)


def _load_options(parser: argparse.ArgumentParser) -> None:
    """The sweep and the size of each request."""
    parser.add_argument(
        "--concurrency",
        type=concurrency_list,
        default=concurrency_list(DEFAULT_CONCURRENCY),
        help=f"clients at once, one step each (default {DEFAULT_CONCURRENCY})",
    )
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument(
        "--requests",
        type=whole(1, 1_000_000),
        help="requests per step (default: 8 per client, at least 32)",
    )
    amount.add_argument(
        "--duration", type=above(0, 86_400), help="seconds per step, instead of --requests"
    )
    parser.add_argument(
        "--input-tokens",
        type=whole(1, 1_000_000),
        help=f"tokens of text per request (default {DEFAULT_INPUT_TOKENS}, at most half the "
        "model's context)",
    )
    parser.add_argument(
        "--output-tokens",
        type=whole(1, 1_000_000),
        default=DEFAULT_OUTPUT_TOKENS,
        help=f"tokens a generative model writes per request (default {DEFAULT_OUTPUT_TOKENS})",
    )
    parser.add_argument(
        "--clip", help="a WAV file a speech model transcribes (default: a packaged 3 s clip)"
    )


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `benchmark` on `laneway`'s subparsers."""
    parser = sub.add_parser(
        "benchmark",
        help="measure a served model through the API: a concurrency sweep, stored as records",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="a model the server serves (an id or alias)")
    parser.add_argument(
        "--base-url", help=f"the laneway (default: LANEWAY_BASE_URL, else {DEFAULT_BASE_URL})"
    )
    parser.add_argument(
        "--api-key", help="bearer token (default: OPENAI_API_KEY, else LANEWAY_API_KEY)"
    )
    _load_options(parser)
    parser.add_argument(
        "--timeout",
        type=above(0, 86_400),
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds to wait for a warm worker (default {DEFAULT_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--request-timeout",
        type=above(0, 86_400),
        default=DEFAULT_REQUEST_TIMEOUT_S,
        help=f"seconds one request may take (default {DEFAULT_REQUEST_TIMEOUT_S:g})",
    )
    parser.add_argument("--no-store", action="store_true", help="print, keep no records")
    parser.add_argument("--json", action="store_true", help="print the records as JSON")
    parser.set_defaults(func=cmd_benchmark)
