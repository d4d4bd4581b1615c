"""Who owns a file or a batch: the owner of the API key that made it.

Every query that reads files or batches for a caller goes through ``owned_by``, so an
object of another owner is simply not found (404, the answer for an id that does not
exist: a caller cannot even learn that it does). ``None`` is an owner like any other: the
one an API without keys, or with the single ``LANEWAY_API_KEY``, works as, so upgrading
to keys leaves the objects made before with that key's holder.
"""

from __future__ import annotations

import hashlib
from typing import Any

from tasks.store.safety import check_idempotency_key

Owner = str | None
ANONYMOUS = "anon:"  # the stored Idempotency-Keys of the owner None


def owned_by(column: Any, owner: Owner) -> Any:
    """The SQL condition ``column`` belongs to ``owner`` (NULL compares as an owner)."""
    return column.is_(None) if owner is None else column == owner


def scoped_idempotency_key(key: str | None, owner: Owner) -> str | None:
    """The ``Idempotency-Key`` as stored: a digest of owner and key, for every owner,
    the one without a key (None) included, so no value a client sends can equal another
    owner's stored key (the column is unique across owners). Lookups also filter by owner
    (``owned_by``)."""
    key = check_idempotency_key(key)
    if key is None:
        return None
    if owner is None:  # the form migration 0006 gave the keys stored before
        return ANONYMOUS + hashlib.sha256(key.encode("utf-8")).hexdigest()
    digest = hashlib.sha256(f"{owner}\x00{key}".encode()).hexdigest()
    return f"owner:{digest}"
