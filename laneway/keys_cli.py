"""`laneway keys create|list|revoke`: API keys in the database the API uses.

They read ``LANEWAY_DATABASE_URL`` (or the SQLite file in ``LANEWAY_DATA_DIR``) exactly as
the API does, bring it to the latest revision first, and change nothing else: a running
API picks a new or revoked key up within ``LANEWAY_KEYS_REFRESH_S``. ``create`` prints the
new key alone on its last line (the only time it is shown; the database keeps its hash).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

from laneway.argtypes import above, whole


def _when(ts: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts)) + "Z" if ts else "-"


def _limit(value: int | None) -> str:
    return "default" if value is None else ("none" if value == 0 else str(value))


def cmd_create(args: argparse.Namespace) -> int:
    from tasks.access.keys import create_key

    made = create_key(
        args.name,
        owner=args.owner,
        expires_in_days=args.expires_in,
        rpm=args.rpm,
        tpm=args.tpm,
        quota={name: getattr(args, f"max_{name}") for name, _ in QUOTA_FLAGS},
    )
    row = made.row
    print(
        f"created key {row['name']!r} (owner {row['owner']!r}), expires {_when(row['expires_at'])}"
    )
    print("store it now: it is not shown again")
    print(made.key)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from tasks.access.keys import list_keys

    rows = list_keys()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no keys in the database")
        return 0
    header = ("NAME", "OWNER", "PREFIX", "STATE", "CREATED", "EXPIRES", "RPM", "TPM")
    table = [header] + [_row(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    return 0


def _row(r: dict[str, Any]) -> tuple[str, ...]:
    return (
        r["name"],
        r["owner"],
        r["prefix"] + "…",
        r["state"],
        _when(r["created_at"]),
        _when(r["expires_at"]),
        _limit(r["rpm"]),
        _limit(r["tpm"]),
    )


def cmd_revoke(args: argparse.Namespace) -> int:
    from tasks.access.keys import revoke_key

    row = revoke_key(args.name)
    print(f"revoked key {row['name']!r} at {_when(row['revoked_at'])}")
    return 0


def _run(func: Any) -> Any:
    """Migrate, then run ``func``; a refused input is a message and exit status 2."""

    def run(args: argparse.Namespace) -> int:
        from tasks.errors import LanewayError
        from tasks.store.db import migrate

        logging.getLogger("alembic").setLevel(logging.WARNING)  # not a migration's story
        migrate()
        try:
            return int(func(args))
        except LanewayError as exc:
            print(f"laneway keys: {exc.message}", file=sys.stderr)
            return 2

    return run


MAX_LIMIT = 2**31 - 1  # the column is an INTEGER
MAX_QUOTA = 2**63 - 1  # a BIGINT
# the quotas `create` overrides (tasks/access/quotas.py): field, what it bounds
QUOTA_FLAGS = (
    ("stored_bytes", "bytes of files the key's owner keeps"),
    ("files", "files the key's owner keeps"),
    ("open_batches", "batches of the key's owner not finished"),
    ("batch_lines", "requests of the key's owner's running batches not answered yet"),
)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `keys` and its commands on `laneway`'s subparsers."""
    keys = sub.add_parser("keys", help="API keys in the database (create, list, revoke)")
    commands = keys.add_subparsers(dest="keys_command", required=True)

    create = commands.add_parser("create", help="make a key; prints it once, on the last line")
    create.add_argument("--name", required=True, help="unique; shown in logs and `keys list`")
    create.add_argument("--owner", help="whose files and batches the key sees (default: its name)")
    create.add_argument("--expires-in", type=above(0, 36500), metavar="DAYS", help="default: never")
    create.add_argument(
        "--rpm",
        type=whole(0, MAX_LIMIT),
        help="requests per minute (0: none; default LANEWAY_RATE_LIMIT_RPM)",
    )
    create.add_argument(
        "--tpm",
        type=whole(0, MAX_LIMIT),
        help="tokens per minute (0: none; default LANEWAY_RATE_LIMIT_TPM)",
    )
    for name, what in QUOTA_FLAGS:
        create.add_argument(
            f"--max-{name.replace('_', '-')}",
            type=whole(0, MAX_QUOTA if name == "stored_bytes" else MAX_LIMIT),
            help=f"quota: {what} (0: none; default LANEWAY_QUOTA_{name.upper()})",
        )
    create.set_defaults(func=_run(cmd_create))

    listing = commands.add_parser("list", help="every key: name, owner, state, limits")
    listing.add_argument("--json", action="store_true", help="as JSON")
    listing.set_defaults(func=_run(cmd_list))

    revoke = commands.add_parser("revoke", help="revoke a key by name")
    revoke.add_argument("name")
    revoke.set_defaults(func=_run(cmd_revoke))
