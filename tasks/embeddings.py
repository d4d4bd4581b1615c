"""The embeddings request contract shared by the API (before enqueue) and the workers."""

from __future__ import annotations

import base64
from array import array

from configs.catalog import CatalogEntry
from tasks.errors import InvalidRequest

CAPABILITY = "embeddings"


def check_dimensions(entry: CatalogEntry, dimensions: int | None) -> None:
    """The one rule for `dimensions`: only the sizes a Matryoshka model was trained for."""
    if dimensions is None or dimensions == entry.dimensions:
        return
    if not entry.supports_dimensions:
        raise InvalidRequest(
            f"model {entry.id!r} does not support the 'dimensions' parameter",
            param="dimensions",
        )
    if dimensions not in entry.matryoshka_dims:
        allowed = ", ".join(str(d) for d in entry.matryoshka_dims)
        raise InvalidRequest(
            f"model {entry.id!r} supports dimensions {allowed}; got {dimensions}",
            param="dimensions",
        )


def decode_vector(b64: str) -> list[float]:
    """Little-endian float32 base64 (the wire format) to a list of floats."""
    values = array("f", base64.b64decode(b64))
    if array("f").itemsize != 4:  # pragma: no cover - every platform we run on
        raise RuntimeError("float32 array type expected")
    return values.tolist()
