"""API keys kept in the database (`laneway keys create|list|revoke`).

A key is ``lw-`` and 43 random URL-safe characters (256 bits), shown once when made; the
database keeps its SHA-256 only. A slow password hash would buy nothing for a random key
of that length, and the API looks keys up on every request. ``load_records`` is what an
API process reads (every ``LANEWAY_KEYS_REFRESH_S``) to authenticate from memory.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from configs.settings import KEY_NAME
from tasks.access.quotas import FIELDS as QUOTA_FIELDS  # stored as columns max_<name>
from tasks.errors import InvalidRequest, NotFound, quote
from tasks.store.db import session_scope
from tasks.store.models import ApiKeyRow

KEY_PREFIX = "lw-"
SHOWN_PREFIX = 8  # characters of a key `laneway keys list` shows


def hash_key(key: bytes | str) -> str:
    raw = key.encode("utf-8") if isinstance(key, str) else key
    return hashlib.sha256(raw).hexdigest()


def check_name(value: str, what: str = "name") -> str:
    if not KEY_NAME.fullmatch(value):
        raise InvalidRequest(
            f"a key's {what} is 1-64 characters of letters, digits, '.', '_' and '-', "
            f"starting with a letter or digit; got {quote(value)}"
        )
    return value


@dataclass(frozen=True)
class KeyRecord:
    """What authenticating needs of a key (static or from the database)."""

    name: str
    owner: str | None
    expires_at: int | None = None
    revoked_at: int | None = None
    rpm: int | None = None
    tpm: int | None = None
    # quota overrides by tasks.access.quotas field name (None or absent: the settings' default)
    quota: Mapping[str, int | None] = field(default_factory=dict)


@dataclass(frozen=True)
class NewKey:
    key: str
    row: dict[str, Any]


def create_key(
    name: str,
    *,
    owner: str | None = None,
    expires_in_days: float | None = None,
    rpm: int | None = None,
    tpm: int | None = None,
    quota: Mapping[str, int | None] | None = None,
) -> NewKey:
    """Make a key; the returned ``key`` is the only time it exists in clear. ``quota``
    overrides the settings' quotas (``tasks.access.quotas.FIELDS``) for this key."""
    check_name(name)
    owner = check_name(owner, "owner") if owner is not None else name
    if expires_in_days is not None and expires_in_days <= 0:
        raise InvalidRequest("--expires-in must be a positive number of days")
    quota = dict(quota or {})
    if unknown := set(quota) - set(QUOTA_FIELDS):
        raise InvalidRequest(f"unknown quotas: {', '.join(sorted(unknown))}")
    for limit in (rpm, tpm, *quota.values()):
        if limit is not None and limit < 0:
            raise InvalidRequest("limits are 0 (none) or a positive number")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    now = int(time.time())
    row = ApiKeyRow(
        name=name,
        owner=owner,
        key_hash=hash_key(key),
        prefix=key[:SHOWN_PREFIX],
        created_at=now,
        expires_at=now + int(expires_in_days * 86400) if expires_in_days else None,
        rpm=rpm,
        tpm=tpm,
        **{f"max_{name}": quota.get(name) for name in QUOTA_FIELDS},
    )
    try:
        with session_scope() as s:
            s.add(row)
            s.flush()
            return NewKey(key, describe(row))
    except IntegrityError:
        raise InvalidRequest(f"a key named {quote(name)} exists already") from None


def describe(row: ApiKeyRow) -> dict[str, Any]:
    """A key as `laneway keys list` shows it (never its hash)."""
    now = time.time()
    if row.revoked_at is not None:
        state = "revoked"
    elif row.expires_at is not None and row.expires_at <= now:
        state = "expired"
    else:
        state = "active"
    return {
        "name": row.name,
        "owner": row.owner,
        "prefix": row.prefix,
        "state": state,
        "created_at": row.created_at,
        "expires_at": row.expires_at,
        "revoked_at": row.revoked_at,
        "rpm": row.rpm,
        "tpm": row.tpm,
        **{f"max_{name}": getattr(row, f"max_{name}") for name in QUOTA_FIELDS},
    }


def list_keys() -> list[dict[str, Any]]:
    with session_scope() as s:
        return [describe(r) for r in s.scalars(select(ApiKeyRow).order_by(ApiKeyRow.id))]


def revoke_key(name: str) -> dict[str, Any]:
    """Revoke by name (idempotent: a revoked key stays revoked from its first time)."""
    with session_scope() as s:
        row = s.scalars(select(ApiKeyRow).where(ApiKeyRow.name == name)).first()
        if row is None:
            raise NotFound(f"no key named {quote(name)}")
        if row.revoked_at is None:
            row.revoked_at = int(time.time())
        return describe(row)


def load_records() -> dict[str, KeyRecord]:
    """Every key in the database by its hash, revoked and expired ones included (they
    answer 401 saying so, and any key at all means the API needs one)."""
    with session_scope() as s:
        rows = s.execute(
            select(
                ApiKeyRow.key_hash,
                ApiKeyRow.name,
                ApiKeyRow.owner,
                ApiKeyRow.expires_at,
                ApiKeyRow.revoked_at,
                ApiKeyRow.rpm,
                ApiKeyRow.tpm,
                *(getattr(ApiKeyRow, f"max_{name}") for name in QUOTA_FIELDS),
            )
        ).all()
    records: dict[str, KeyRecord] = {}
    for key_hash, name, owner, expires_at, revoked_at, rpm, tpm, *quota in rows:
        overrides = dict(zip(QUOTA_FIELDS, quota, strict=True))
        records[key_hash] = KeyRecord(name, owner, expires_at, revoked_at, rpm, tpm, overrides)
    return records
