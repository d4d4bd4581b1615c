"""Images inside chat messages: data: URIs, checks, wire form.

Pure logic, no torch: the API process and the workers both import it.

* ``resolve_image_url`` (async, for the API) and ``resolve_image_url_sync`` (for workers
  running Batch API lines) turn one ``image_url.url`` into checked bytes and an
  ``ImageInfo``; every refusal is an ``InvalidRequest``. Remote URLs go through
  ``tasks.media.image_fetch.ImageFetcher`` (the guarded fetcher and its address rules).
* ``PixelBudget``: the pixels of one request's images together, refused once past
  ``image_max_request_pixels`` (before the image that passes it is decoded). The number
  of images is capped earlier, before any is decoded or fetched (``tasks.contracts.chat``).
* ``to_wire`` / ``from_wire`` / ``release``: how an image travels to a worker, inline
  base64 when small, else a file-store reference the worker deletes when done.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from PIL import GifImagePlugin, Image, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

from configs.settings import Settings
from tasks.errors import InvalidRequest, quote
from tasks.filestore import FileStore
from tasks.media.image_fetch import DISABLED_TEXT, PARAM, ImageFetcher, refuse, too_large

# file-store keys of images sent by reference start with this
WIRE_PREFIX = "images/"
# data: URI media subtypes -> format names
DATA_URI_TYPES = {"png": "png", "jpeg": "jpeg", "jpg": "jpeg", "webp": "webp", "gif": "gif"}
# the only decoders Pillow may try (imported above, so opening needs no full plugin scan)
OPEN_FORMATS = (
    PngImagePlugin.PngImageFile.format,
    JpegImagePlugin.JpegImageFile.format,
    WebPImagePlugin.WebPImageFile.format,
    GifImagePlugin.GifImageFile.format,
)
# Pillow format names -> format names (the JPEG decoder answers MPO for the multi-picture
# JPEGs phones write)
PIL_FORMATS = {"PNG": "png", "JPEG": "jpeg", "MPO": "jpeg", "WEBP": "webp", "GIF": "gif"}
FORMATS_TEXT = "PNG, JPEG, WebP or GIF"


@dataclass(frozen=True)
class ImageInfo:
    format: str  # png, jpeg, webp or gif
    width: int
    height: int


# -- data: URIs ------------------------------------------------------------------------------


def decode_data_uri(url: str, settings: Settings) -> bytes:
    """The bytes of a ``data:image/<png|jpeg|webp|gif>;base64,...`` URI."""
    if url[:5].lower() != "data:":
        raise refuse("The image URL is not a data: URI.")
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise refuse("Invalid image data URI: expected data:image/<type>;base64,<data>.")
    media, *params = (p.strip().lower() for p in header.split(";"))
    if not media.startswith("image/") or media[6:] not in DATA_URI_TYPES:
        raise refuse(
            f"Unsupported media type {quote(media)} in the image data URI; "
            "use image/png, image/jpeg, image/webp or image/gif."
        )
    if not params or params[-1] != "base64":
        raise refuse("Image data URIs must be base64-encoded (data:image/png;base64,<data>).")
    # checked before decoding: a huge payload costs nothing to refuse
    if len(payload) > 4 * ((settings.image_max_bytes + 2) // 3):
        raise too_large(settings)
    if not payload:
        raise refuse("The image data URI holds no data.")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise refuse("The image data URI does not hold valid base64 data.") from None
    if len(data) > settings.image_max_bytes:
        raise too_large(settings)
    return data


# -- decoding ---------------------------------------------------------------------------------


def _guard_pillow(max_pixels: int) -> None:
    """Keep Pillow's own decompression-bomb guard on and no tighter than our limit.

    ``check_image`` compares the size with ``image_max_pixels`` itself before decoding;
    Pillow's guard (it warns above ``MAX_IMAGE_PIXELS`` and refuses above twice that,
    while still reading the header) is the backstop, so it must not be switched off."""
    current = Image.MAX_IMAGE_PIXELS
    if current is None or current < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def _too_many_pixels(
    settings: Settings, width: int | None = None, height: int | None = None
) -> InvalidRequest:
    size = f" ({width}x{height})" if width is not None and height is not None else ""
    return refuse(
        f"The image{size} has more pixels than this server's limit of "
        f"{settings.image_max_pixels} pixels per image."
    )


class PixelBudget:
    """The pixels of one request's images, summed as each is checked (one per request)."""

    def __init__(self, settings: Settings) -> None:
        self.limit = settings.image_max_request_pixels
        self.total = 0

    def take(self, width: int, height: int) -> None:
        self.total += width * height
        if self.total > self.limit:
            raise refuse(
                f"The images of this request have more pixels together (at least "
                f"{self.total}) than this server's limit of {self.limit} pixels per request; "
                "send fewer or smaller images."
            )


def check_image(data: bytes, settings: Settings, budget: PixelBudget | None = None) -> ImageInfo:
    """Open ``data`` with Pillow, check its format and size, decode its (first) frame.

    With ``budget``, its pixels are counted against the request's before it is decoded."""
    if not data:
        raise refuse("The image is empty.")
    if len(data) > settings.image_max_bytes:
        raise too_large(settings)
    _guard_pillow(settings.image_max_pixels)
    try:
        with Image.open(io.BytesIO(data), formats=OPEN_FORMATS) as img:
            fmt = PIL_FORMATS.get(img.format or "")
            width, height = img.size
            if fmt is None:
                raise refuse(f"The image is not a {FORMATS_TEXT} image.")
            if width <= 0 or height <= 0:
                raise refuse("The image has no pixels.")
            if width * height > settings.image_max_pixels:
                raise _too_many_pixels(settings, width, height)
            if budget is not None:
                budget.take(width, height)
            img.load()
    except InvalidRequest:
        raise
    except Image.DecompressionBombError:
        raise _too_many_pixels(settings) from None
    except Image.UnidentifiedImageError:
        raise refuse(f"The image could not be read: it is not a {FORMATS_TEXT} image.") from None
    except Exception:
        raise refuse("The image could not be decoded: the file is truncated or corrupt.") from None
    return ImageInfo(format=fmt, width=width, height=height)


# -- the entry points -------------------------------------------------------------------------


def _scheme(url: str) -> str:
    head, colon, _ = url[:16].partition(":")
    return head.lower() if colon else ""


def _route(url: str, settings: Settings) -> str:
    """``data`` or ``remote``, or an ``InvalidRequest`` saying why neither."""
    scheme = _scheme(url)
    if scheme == "data":
        return "data"
    if scheme in ("http", "https"):
        if not settings.image_fetch:
            raise refuse(DISABLED_TEXT)
        return "remote"
    if not scheme:
        raise refuse(
            "Invalid image URL: expected a base64 data: URI (data:image/png;base64,...) "
            "or an http(s) URL."
        )
    raise refuse(
        f"Unsupported image URL scheme {quote(scheme)}; use a base64 data: URI or an http(s) URL."
    )


def _decode_checked(
    url: str, settings: Settings, budget: PixelBudget | None
) -> tuple[bytes, ImageInfo]:
    data = decode_data_uri(url, settings)
    return data, check_image(data, settings, budget)


def _with_param(exc: InvalidRequest, param: str) -> InvalidRequest:
    exc.param = param
    return exc


async def resolve_image_url(
    url: str,
    settings: Settings,
    fetcher: ImageFetcher | None = None,
    *,
    param: str = PARAM,
    budget: PixelBudget | None = None,
) -> tuple[bytes, ImageInfo]:
    """One ``image_url.url`` of a chat message -> checked bytes and what they are
    (``budget``: the request's ``PixelBudget``, which this image's pixels are taken from).

    Decoding runs in a thread, so a large image does not hold up the event loop."""
    try:
        if _route(url, settings) == "data":
            return await asyncio.to_thread(_decode_checked, url, settings, budget)
        data = await (fetcher or ImageFetcher(settings)).fetch(url)
        return data, await asyncio.to_thread(check_image, data, settings, budget)
    except InvalidRequest as exc:
        raise _with_param(exc, param) from None


def resolve_image_url_sync(
    url: str,
    settings: Settings,
    fetcher: ImageFetcher | None = None,
    *,
    param: str = PARAM,
    budget: PixelBudget | None = None,
) -> tuple[bytes, ImageInfo]:
    """``resolve_image_url`` for threads (workers running Batch API lines)."""
    try:
        if _route(url, settings) == "data":
            return _decode_checked(url, settings, budget)
        data = (fetcher or ImageFetcher(settings)).fetch_sync(url)
        return data, check_image(data, settings, budget)
    except InvalidRequest as exc:
        raise _with_param(exc, param) from None


# -- wire form --------------------------------------------------------------------------------


def to_wire(data: bytes, info: ImageInfo, store: FileStore, settings: Settings) -> dict[str, str]:
    """How an image travels in a Redis message: inline when small, else by reference."""
    if len(data) <= settings.image_inline_max_bytes:
        return {"b64": base64.b64encode(data).decode("ascii"), "format": info.format}
    key = f"{WIRE_PREFIX}{uuid.uuid4().hex}"
    store.write_from(key, io.BytesIO(data))
    return {"ref": key, "format": info.format}


def _ref_key(obj: Mapping[str, Any]) -> str:
    key = obj.get("ref")
    if not isinstance(key, str) or not key.startswith(WIRE_PREFIX):
        raise ValueError(f"not an image reference: {quote(key)}")
    return key


def from_wire(obj: Mapping[str, Any], store: FileStore) -> bytes:
    """The bytes ``to_wire`` sent."""
    if "b64" in obj:
        return base64.b64decode(obj["b64"], validate=True)
    with store.open(_ref_key(obj)) as f:
        return f.read()


def release(obj: Mapping[str, Any], store: FileStore) -> None:
    """Delete the stored copy of a by-reference image (inline ones hold nothing)."""
    if "ref" in obj:
        store.delete(_ref_key(obj))
