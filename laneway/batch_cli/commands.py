"""`laneway batch submit | status | list | cancel | download`: the Batch API for people.

It speaks plain HTTP (httpx) to any laneway, local or remote: ``--base-url`` (else
``LANEWAY_BASE_URL``, else http://127.0.0.1:8000) and ``--api-key`` (else
``OPENAI_API_KEY``). ``submit`` checks the JSONL file before uploading it, and with
``--wait`` follows the batch with a progress line, then downloads its output and error
files next to the input. Ctrl-C while waiting detaches: the batch keeps running.

Exit codes: 0 the batch completed (or the request succeeded), 1 the batch failed,
expired or was cancelled, or the server answered with an error, 2 bad usage or a bad
input file, 130 detached with Ctrl-C.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import httpx

from configs.capabilities import REGISTRY
from laneway.argtypes import above, whole
from laneway.batch_cli.client import DEFAULT_BASE_URL, Api, ApiError, Batch, base_url
from laneway.batch_cli.input_file import check_jsonl, output_paths
from laneway.batch_cli.progress import FINISHED, Progress, wait

EXIT_OK, EXIT_BATCH, EXIT_USAGE, EXIT_DETACHED = 0, 1, 2, 130


class UsageError(Exception):
    """Bad arguments or a bad input file: exit 2."""


class Detached(Exception):
    """Ctrl-C while following a batch (it keeps running)."""

    def __init__(self, batch_id: str) -> None:
        super().__init__(batch_id)
        self.batch_id = batch_id


# -- printing ---------------------------------------------------------------------------------


def _when(ts: Any) -> str:
    if not isinstance(ts, int | float):
        return "-"
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def describe(batch: Batch) -> list[str]:
    """The lines `status` prints: status, counts, file ids, metadata, errors."""
    counts = batch.get("request_counts") or {}
    rows = [
        ("id", batch.get("id")),
        ("status", batch.get("status")),
        ("endpoint", batch.get("endpoint")),
        ("model", batch.get("model")),
        (
            "requests",
            f"{counts.get('completed', 0)} completed  {counts.get('failed', 0)} failed  "
            f"{counts.get('total', 0)} total",
        ),
        ("input file", batch.get("input_file_id")),
        ("output file", batch.get("output_file_id")),
        ("error file", batch.get("error_file_id")),
        ("created", _when(batch.get("created_at"))),
        ("expires", _when(batch.get("expires_at"))),
    ]
    for key in ("completed", "failed", "expired", "cancelled"):
        if batch.get(f"{key}_at"):
            rows.append((key, _when(batch[f"{key}_at"])))
    if batch.get("metadata"):
        pairs = ", ".join(f"{k}={v}" for k, v in batch["metadata"].items())
        rows.append(("metadata", pairs))
    lines = [f"{name:<12} {value if value is not None else '-'}" for name, value in rows]
    errors = (batch.get("errors") or {}).get("data") or []
    if errors:
        lines.append("errors:")
        for e in errors:
            where = f"line {e['line']}: " if e.get("line") else ""
            lines.append(f"  {where}{e.get('message')} ({e.get('code')})")
    return lines


def _resume_hint(batch_id: str) -> str:
    return (
        f"detached; batch {batch_id} keeps running on the server (it was not cancelled).\n"
        f"  follow it:   laneway batch status {batch_id} --wait\n"
        f"  results:     laneway batch download {batch_id}\n"
        f"  stop it:     laneway batch cancel {batch_id}"
    )


def _exit_for(batch: Batch) -> int:
    return EXIT_OK if batch["status"] == "completed" else EXIT_BATCH


# -- commands ---------------------------------------------------------------------------------


@dataclass
class Context:
    """What every command gets: the API client and where to print."""

    api: Api
    out: TextIO
    err: TextIO
    interval: float


def _download_results(ctx: Context, batch: Batch, output: Path, errors: Path) -> None:
    for file_id, dest, what in (
        (batch.get("output_file_id"), output, "output"),
        (batch.get("error_file_id"), errors, "errors"),
    ):
        if file_id:
            lines = ctx.api.download(file_id, dest)
            print(f"{what:<7} {dest} ({lines} lines)", file=ctx.out)


def _follow(ctx: Context, batch_id: str) -> Batch:
    progress = Progress(ctx.out, tty=ctx.out.isatty())
    try:
        return wait(ctx.api, batch_id, progress, ctx.interval)
    except KeyboardInterrupt:
        raise Detached(batch_id) from None


def _finished_summary(ctx: Context, batch: Batch) -> None:
    counts = batch.get("request_counts") or {}
    print(
        f"batch {batch['id']} {batch['status']}: {counts.get('completed', 0)} completed, "
        f"{counts.get('failed', 0)} failed of {counts.get('total', 0)}",
        file=ctx.out,
    )
    for e in (batch.get("errors") or {}).get("data") or []:
        where = f"line {e['line']}: " if e.get("line") else ""
        print(f"  {where}{e.get('message')} ({e.get('code')})", file=ctx.out)


def cmd_submit(ctx: Context, args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    count, problems = check_jsonl(path, args.endpoint)
    if problems:
        detail = "\n".join(f"  {p}" for p in problems)
        raise UsageError(f"{path} is not a valid batch input (nothing uploaded):\n{detail}")
    upload = ctx.api.upload(path)
    print(f"uploaded {path} ({count} requests) as {upload['id']}", file=ctx.out)
    batch = ctx.api.create(upload["id"], args.endpoint, args.completion_window, dict(args.metadata))
    print(f"created {batch['id']} ({batch['status']})", file=ctx.out)
    if not args.wait:
        print(f"follow it with: laneway batch status {batch['id']} --wait", file=ctx.out)
        return EXIT_OK
    batch = _follow(ctx, batch["id"])
    _finished_summary(ctx, batch)
    _download_results(ctx, batch, *output_paths(path))
    return _exit_for(batch)


def cmd_status(ctx: Context, args: argparse.Namespace) -> int:
    batch = _follow(ctx, args.batch_id) if args.wait else ctx.api.retrieve(args.batch_id)
    print("\n".join(describe(batch)), file=ctx.out)
    return _exit_for(batch) if args.wait else EXIT_OK


def cmd_list(ctx: Context, args: argparse.Namespace) -> int:
    page = ctx.api.listing(args.limit)
    rows = page.get("data") or []
    if not rows:
        print("no batches", file=ctx.out)
    for b in rows:
        counts = b.get("request_counts") or {}
        done = int(counts.get("completed") or 0) + int(counts.get("failed") or 0)
        print(
            f"{b['id']}  {b['status']:<11}  {b.get('endpoint')}  "
            f"{done}/{counts.get('total', 0)} done  {counts.get('failed', 0)} failed  "
            f"{_when(b.get('created_at'))}",
            file=ctx.out,
        )
    if page.get("has_more"):
        print("(more batches; raise --limit, at most 100, to see them)", file=ctx.out)
    return EXIT_OK


def cmd_cancel(ctx: Context, args: argparse.Namespace) -> int:
    batch = ctx.api.cancel(args.batch_id)
    print(f"{batch['id']} {batch['status']}", file=ctx.out)
    return EXIT_OK


def cmd_download(ctx: Context, args: argparse.Namespace) -> int:
    batch = ctx.api.retrieve(args.batch_id)
    if batch["status"] not in FINISHED:
        print(
            f"batch {batch['id']} is {batch['status']}; its files come when it finishes: "
            f"laneway batch status {batch['id']} --wait",
            file=ctx.err,
        )
        return EXIT_BATCH
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    _finished_summary(ctx, batch)
    output = directory / f"{batch['id']}.output.jsonl"
    errors = directory / f"{batch['id']}.errors.jsonl"
    _download_results(ctx, batch, output, errors)
    return _exit_for(batch)


# -- the parser -------------------------------------------------------------------------------


Command = Callable[[Context, argparse.Namespace], int]


def _run(command: Command, args: argparse.Namespace) -> int:
    """Build the client, run ``command`` and turn its failures into exit codes."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # no log line per poll
    out: TextIO = getattr(args, "out", None) or sys.stdout
    err: TextIO = getattr(args, "err", None) or sys.stderr
    url = base_url(args.base_url, os.environ)
    api = Api(url, args.api_key or os.environ.get("OPENAI_API_KEY"), args.transport)
    try:
        return command(Context(api, out, err, args.interval), args)
    except UsageError as exc:
        print(f"laneway batch: {exc}", file=err)
        return EXIT_USAGE
    except ApiError as exc:
        print(f"laneway batch: {exc}", file=err)
        return EXIT_BATCH
    except Detached as exc:
        print(f"\n{_resume_hint(exc.batch_id)}", file=err)
        return EXIT_DETACHED
    except KeyboardInterrupt:
        print("\ninterrupted", file=err)
        return EXIT_DETACHED
    finally:
        api.close()


def _metadata(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not key=value")
    return key, value


def _command(parser: argparse.ArgumentParser, command: Command) -> None:
    parser.add_argument(
        "--base-url", help=f"the laneway (default: LANEWAY_BASE_URL, else {DEFAULT_BASE_URL})"
    )
    parser.add_argument("--api-key", help="bearer token (default: OPENAI_API_KEY)")
    parser.set_defaults(func=functools.partial(_run, command), transport=None, interval=1.0)


def _wait_options(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--wait", action="store_true", help=what)
    parser.add_argument(
        "--interval", type=above(0), default=1.0, help="seconds between polls (default 1)"
    )


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `batch` and its commands on `laneway`'s subparsers."""
    batch = sub.add_parser("batch", help="submit and follow batches on a laneway over HTTP")
    commands = batch.add_subparsers(dest="batch_command", required=True)

    submit = commands.add_parser("submit", help="check, upload and create a batch")
    submit.add_argument("file", help="the JSONL input file")
    submit.add_argument(
        "--endpoint",
        required=True,
        help="one of " + ", ".join(e for c in REGISTRY.values() for e in c.batch_endpoints),
    )
    submit.add_argument("--completion-window", default="24h")
    submit.add_argument(
        "--metadata", type=_metadata, action="append", default=[], help="key=value, repeatable"
    )
    _wait_options(submit, "follow it, then download its files next to the input")
    _command(submit, cmd_submit)

    status = commands.add_parser("status", help="a batch's status, counts and files")
    status.add_argument("batch_id")
    _wait_options(status, "follow it until it finishes")
    _command(status, cmd_status)

    listing = commands.add_parser("list", help="recent batches")
    listing.add_argument("--limit", type=whole(1, 100), default=20, help="1 to 100 (default 20)")
    _command(listing, cmd_list)

    cancel = commands.add_parser("cancel", help="cancel a batch")
    cancel.add_argument("batch_id")
    _command(cancel, cmd_cancel)

    download = commands.add_parser("download", help="a finished batch's output and error files")
    download.add_argument("batch_id")
    download.add_argument("--dir", default=".", help="where to write them (default: here)")
    _command(download, cmd_download)


def main(
    argv: list[str] | None = None,
    *,
    transport: httpx.BaseTransport | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """`laneway batch ...` on its own (``python -m laneway.batch_cli submit ...``)."""
    parser = argparse.ArgumentParser(prog="laneway", description=__doc__)
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["batch", *(sys.argv[1:] if argv is None else argv)])
    args.transport, args.out, args.err = transport, out, err
    code: int = args.func(args)
    return code
