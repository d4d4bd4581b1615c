"""Images inside chat messages: data: URIs, guarded remote fetches, checks, wire form.

Pure logic, no torch: the API process and the workers both import it.

* ``resolve_image_url`` (async, for the API) and ``resolve_image_url_sync`` (for workers
  running Batch API lines) turn one ``image_url.url`` into checked bytes and an
  ``ImageInfo``; every refusal is an ``InvalidRequest``.
* ``ImageFetcher`` fetches remote images only when ``settings.image_fetch`` is on, only
  from ``settings.image_fetch_hosts``, never from loopback, private, link-local, metadata
  or otherwise non-public addresses. It resolves each host itself, checks every address,
  then connects to the address it checked (the URL carries the IP; ``Host`` and TLS SNI
  carry the name), so a DNS answer that changes between check and connect cannot bypass
  the check. Redirects are followed by hand, each hop checked again.
* ``to_wire`` / ``from_wire`` / ``release``: how an image travels to a worker, inline
  base64 when small, else a file-store reference the worker deletes when done.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import io
import ipaddress
import re
import socket
import ssl
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
from PIL import GifImagePlugin, Image, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

from configs.settings import Settings
from tasks.errors import InvalidRequest, quote
from tasks.filestore import FileStore

# the parameter refusals name unless the caller passes a more precise one
PARAM = "messages"
MAX_REDIRECTS = 3
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# file-store keys of images sent by reference start with this
WIRE_PREFIX = "images/"
USER_AGENT = "laneway-image-fetch"
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

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# (host, port) -> the addresses the host resolves to, as strings
Resolver = Callable[[str, int], Sequence[str]]

_DISABLED = (
    "Remote image URLs are disabled on this server; send the image inline as a base64 "
    "data: URI instead (data:image/png;base64,...)."
)
_PRIVATE_NETWORKS = "this server does not fetch images from private or internal networks"

# metadata services of cloud providers (AWS, GCP, Azure link-local; AWS IPv6; Alibaba;
# Azure wireserver, which is a public address; Oracle)
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",
        "fd00:ec2::254",
        "100.100.100.200",
        "168.63.129.16",
        "192.0.0.192",
    )
)
# refused whatever the ``ipaddress`` properties say (they differ between Python versions)
BLOCKED_NETWORKS: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.ip_network(net), label)
    for net, label in (
        ("0.0.0.0/8", "unspecified"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "carrier-grade NAT"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "reserved"),
        ("192.0.2.0/24", "documentation"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "reserved"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("64:ff9b:1::/48", "NAT64 local-use"),
        ("2001::/32", "Teredo"),
        ("2001:db8::/32", "documentation"),
        ("fc00::/7", "private"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local"),
        ("ff00::/8", "multicast"),
    )
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# a host name whose last label is a number is an IPv4 address in some other spelling
# (2130706433, 0x7f000001, 127.1): refused rather than guessed at
_NUMERIC_LABEL = re.compile(r"0x[0-9a-f]*|[0-9]+", re.IGNORECASE)

_dns_pool: ThreadPoolExecutor | None = None


@dataclass(frozen=True)
class ImageInfo:
    format: str  # png, jpeg, webp or gif
    width: int
    height: int


def _size_text(n: int) -> str:
    mib = 1024 * 1024
    return f"{n / mib:g} MiB" if n >= mib else f"{n} bytes"


def _too_large(settings: Settings, detail: str = "") -> InvalidRequest:
    return InvalidRequest(
        f"The image is larger than this server's limit of "
        f"{_size_text(settings.image_max_bytes)} per image{detail}.",
        param=PARAM,
    )


def _refuse(message: str) -> InvalidRequest:
    return InvalidRequest(message, param=PARAM)


# -- data: URIs ------------------------------------------------------------------------------


def decode_data_uri(url: str, settings: Settings) -> bytes:
    """The bytes of a ``data:image/<png|jpeg|webp|gif>;base64,...`` URI."""
    if url[:5].lower() != "data:":
        raise _refuse("The image URL is not a data: URI.")
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise _refuse("Invalid image data URI: expected data:image/<type>;base64,<data>.")
    media, *params = (p.strip().lower() for p in header.split(";"))
    if not media.startswith("image/") or media[6:] not in DATA_URI_TYPES:
        raise _refuse(
            f"Unsupported media type {quote(media)} in the image data URI; "
            "use image/png, image/jpeg, image/webp or image/gif."
        )
    if not params or params[-1] != "base64":
        raise _refuse("Image data URIs must be base64-encoded (data:image/png;base64,<data>).")
    # checked before decoding: a huge payload costs nothing to refuse
    if len(payload) > 4 * ((settings.image_max_bytes + 2) // 3):
        raise _too_large(settings)
    if not payload:
        raise _refuse("The image data URI holds no data.")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _refuse("The image data URI does not hold valid base64 data.") from None
    if len(data) > settings.image_max_bytes:
        raise _too_large(settings)
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
    return _refuse(
        f"The image{size} has more pixels than this server's limit of "
        f"{settings.image_max_pixels} pixels per image."
    )


def check_image(data: bytes, settings: Settings) -> ImageInfo:
    """Open ``data`` with Pillow, check its format and size, decode its (first) frame."""
    if not data:
        raise _refuse("The image is empty.")
    if len(data) > settings.image_max_bytes:
        raise _too_large(settings)
    _guard_pillow(settings.image_max_pixels)
    try:
        with Image.open(io.BytesIO(data), formats=OPEN_FORMATS) as img:
            fmt = PIL_FORMATS.get(img.format or "")
            width, height = img.size
            if fmt is None:
                raise _refuse(f"The image is not a {FORMATS_TEXT} image.")
            if width <= 0 or height <= 0:
                raise _refuse("The image has no pixels.")
            if width * height > settings.image_max_pixels:
                raise _too_many_pixels(settings, width, height)
            img.load()
    except InvalidRequest:
        raise
    except Image.DecompressionBombError:
        raise _too_many_pixels(settings) from None
    except Image.UnidentifiedImageError:
        raise _refuse(f"The image could not be read: it is not a {FORMATS_TEXT} image.") from None
    except Exception:
        raise _refuse("The image could not be decoded: the file is truncated or corrupt.") from None
    return ImageInfo(format=fmt, width=width, height=height)


# -- addresses --------------------------------------------------------------------------------


def address_problem(ip: IPAddress) -> str | None:
    """Why ``ip`` must not be fetched from (a short label), or None when it is public."""
    if ip in METADATA_ADDRESSES:
        return "cloud metadata"
    if isinstance(ip, ipaddress.IPv6Address):
        # IPv4-mapped (::ffff:a.b.c.d), 6to4 (2002::/16), NAT64 (64:ff9b::/96): judged
        # by the IPv4 address inside
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            inner = address_problem(embedded)
            return f"{inner} (inside an IPv6 address)" if inner else None
    for network, label in BLOCKED_NETWORKS:
        if ip.version == network.version and ip in network:
            return label
    checks = (
        (ip.is_loopback, "loopback"),
        (ip.is_unspecified, "unspecified"),
        (ip.is_link_local, "link-local"),
        (ip.is_multicast, "multicast"),
        (ip.is_private, "private"),
        (ip.is_reserved, "reserved"),
        (not ip.is_global, "non-public"),
    )
    return next((label for hit, label in checks if hit), None)


def _parse_address(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def resolve_host(host: str, port: int) -> list[str]:
    """The system resolver: every address ``host`` has for TCP."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def host_allowed(host: str, allowlist: Sequence[str]) -> bool:
    """``host`` is an entry, or a subdomain of a ``.domain`` entry."""
    for raw in allowlist:
        entry = raw.strip().lower().rstrip(".")
        if entry.startswith("."):
            if len(entry) > 1 and host.endswith(entry) and len(host) > len(entry):
                return True
        elif entry and host == entry:
            return True
    return False


# -- one hop of a fetch -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Hop:
    url: httpx.URL  # as the client wrote it (or the redirect said)
    host: str  # ascii, lower case, no trailing dot, no brackets
    port: int
    literal: IPAddress | None  # the host when it is an IP address


@dataclass(frozen=True)
class _Target:
    """Where one request goes: the checked address, with the name in Host and SNI."""

    url: httpx.URL
    headers: dict[str, str]
    extensions: dict[str, Any]


def _parse_url(url: str | httpx.URL) -> httpx.URL:
    try:
        return httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        raise _refuse("The image URL is not a valid URL.") from None


def _redirect_target(response: httpx.Response, current: httpx.URL, hops: int) -> httpx.URL | None:
    """The next URL when ``response`` is a redirect, else None."""
    if response.status_code not in REDIRECT_STATUSES:
        return None
    if hops >= MAX_REDIRECTS:
        raise _refuse(f"The image URL redirected more than {MAX_REDIRECTS} times.")
    location = response.headers.get("location")
    if not location:
        raise _refuse(
            f"Fetching the image URL failed: the server answered HTTP "
            f"{response.status_code} without a Location."
        )
    try:
        return current.join(location)
    except (httpx.InvalidURL, TypeError, ValueError):
        raise _refuse("The image URL redirected to an invalid URL.") from None


def _check_response(response: httpx.Response, settings: Settings) -> None:
    """Status, encoding and announced length, before any of the body is read."""
    if not 200 <= response.status_code < 300:
        reason = f" {response.reason_phrase}" if response.reason_phrase else ""
        raise _refuse(
            f"Fetching the image URL failed: the server answered HTTP "
            f"{response.status_code}{reason}."
        )
    encoding = response.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise _refuse(
            f"The image URL answered with a compressed body (Content-Encoding: "
            f"{quote(encoding)}); this server only fetches uncompressed images."
        )
    length = response.headers.get("content-length", "")
    if length.strip().isdigit() and int(length) > settings.image_max_bytes:
        raise _too_large(settings, f" (the server announced {int(length)} bytes)")


class _Body:
    """The body read so far, refused as soon as it passes the limit."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.buffer = bytearray()

    def add(self, chunk: bytes) -> None:
        if len(self.buffer) + len(chunk) > self.settings.image_max_bytes:
            raise _too_large(self.settings)
        self.buffer += chunk


def _transport_error(exc: httpx.HTTPError, timed_out: InvalidRequest) -> InvalidRequest:
    if isinstance(exc, httpx.TimeoutException):
        return timed_out
    if isinstance(exc, httpx.ConnectError):
        return _refuse("Could not connect to the image URL's host (connection or TLS error).")
    return _refuse("Fetching the image URL failed: the connection broke off.")


@functools.cache
def _default_ssl_context() -> ssl.SSLContext:
    """certifi's CAs, host names checked; built once (loading the CAs takes a while)."""
    return httpx.create_ssl_context()


# -- the fetcher ------------------------------------------------------------------------------


class ImageFetcher:
    """Fetches remote images under every rule in the module docstring.

    ``resolve`` replaces the system resolver (tests map made-up names to 127.0.0.1);
    ``ssl_context`` replaces the default one (certifi's CAs, host names checked).
    ``allow_loopback_for_tests`` lets 127.0.0.0/8 and ::1 through, and nothing else: it
    exists for tests that run a local HTTP server, and is deliberately not a setting."""

    def __init__(
        self,
        settings: Settings,
        *,
        resolve: Resolver | None = None,
        allow_loopback_for_tests: bool = False,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.settings = settings
        self._resolve: Resolver = resolve or resolve_host
        self._allow_loopback = allow_loopback_for_tests
        self._ssl = ssl_context

    # checks shared by both paths

    def _check_enabled(self) -> None:
        if not self.settings.image_fetch:
            raise _refuse(_DISABLED)

    def _check_url(self, url: httpx.URL) -> _Hop:
        """Everything about a URL that needs no DNS: scheme, userinfo, host, allowlist."""
        if url.scheme not in ("http", "https"):
            raise _refuse(
                f"Unsupported image URL scheme {quote(url.scheme)}; use an http(s) URL "
                "or a base64 data: URI."
            )
        if url.userinfo:
            raise _refuse("Image URLs must not contain a user name or password.")
        host = url.raw_host.decode("ascii").lower().rstrip(".")
        if not host:
            raise _refuse("The image URL has no host.")
        port = url.port or (443 if url.scheme == "https" else 80)
        if not 0 < port < 65536:
            raise _refuse(f"The image URL's port {port} is not a valid port.")
        literal = _parse_address(host) if ":" in host or host[-1].isdigit() else None
        if literal is None and _NUMERIC_LABEL.fullmatch(host.rsplit(".", 1)[-1]):
            raise _refuse(
                f"The image URL host {quote(host)} is not a valid host name "
                "(write IP addresses in dotted decimal form)."
            )
        if literal is not None:
            self._check_address(host, literal, resolved=False)
        allowlist = self.settings.image_fetch_hosts
        if not allowlist:
            raise _refuse(
                "Remote image URLs are enabled on this server, but no host is allowed "
                "(its image host list is empty); send the image as a base64 data: URI."
            )
        if not host_allowed(host, allowlist):
            raise _refuse(
                f"The image URL host {quote(host)} is not in this server's list of "
                "allowed image hosts."
            )
        return _Hop(url=url, host=host, port=port, literal=literal)

    def _check_address(self, host: str, ip: IPAddress, *, resolved: bool) -> None:
        if self._allow_loopback and ip.is_loopback and address_problem(ip) == "loopback":
            return
        problem = address_problem(ip)
        if problem is not None:
            verb = "resolves to" if resolved else "is"
            raise _refuse(
                f"The image URL host {quote(host)} {verb} a {problem} address; {_PRIVATE_NETWORKS}."
            )

    def _pick(self, hop: _Hop, addresses: Sequence[str]) -> IPAddress:
        """Every address must be public; the first is the one connected to."""
        checked: list[IPAddress] = []
        for text in addresses:
            ip = _parse_address(text)
            if ip is None:
                break
            self._check_address(hop.host, ip, resolved=True)
            checked.append(ip)
        if not checked or len(checked) != len(addresses):
            raise _refuse(f"The image URL host {quote(hop.host)} could not be resolved.")
        return checked[0]

    def _target(self, hop: _Hop, ip: IPAddress) -> _Target:
        headers = {
            "Host": hop.url.netloc.decode("ascii"),
            "User-Agent": USER_AGENT,
            "Accept": "image/*",
            "Accept-Encoding": "identity",
        }
        extensions: dict[str, Any] = {}
        if hop.url.scheme == "https" and hop.literal is None:
            extensions["sni_hostname"] = hop.host
        return _Target(url=hop.url.copy_with(host=str(ip)), headers=headers, extensions=extensions)

    def _client_options(self, deadline: float) -> dict[str, Any]:
        if self._ssl is None:
            self._ssl = _default_ssl_context()
        # one client per hop and no pooling: a kept-alive connection to an IP must never
        # carry a request for a host name its TLS certificate was not checked against
        return {
            "verify": self._ssl,
            "trust_env": False,  # no proxies or .netrc from the environment
            "follow_redirects": False,
            "timeout": httpx.Timeout(max(deadline - time.monotonic(), 0.001)),
            "limits": httpx.Limits(max_keepalive_connections=0),
        }

    def _timed_out(self) -> InvalidRequest:
        return _refuse(
            f"Timed out fetching the image URL (the limit is "
            f"{self.settings.image_fetch_timeout_s:g} s)."
        )

    # asyncio (the API)

    async def fetch(self, url: str) -> bytes:
        """The body at ``url``, not yet decoded (``resolve_image_url`` checks it)."""
        self._check_enabled()
        first = _parse_url(url)
        deadline = time.monotonic() + self.settings.image_fetch_timeout_s
        try:
            async with asyncio.timeout(self.settings.image_fetch_timeout_s):
                return await self._fetch_async(first, deadline)
        except TimeoutError:
            raise self._timed_out() from None
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self._timed_out()) from None

    async def _fetch_async(self, current: httpx.URL, deadline: float) -> bytes:
        for hops in range(MAX_REDIRECTS + 1):
            hop = self._check_url(current)
            ip = hop.literal
            if ip is None:
                ip = self._pick(hop, await asyncio.to_thread(self._lookup, hop))
            target = self._target(hop, ip)
            async with (
                httpx.AsyncClient(**self._client_options(deadline)) as client,
                client.stream(
                    "GET", target.url, headers=target.headers, extensions=target.extensions
                ) as response,
            ):
                following = _redirect_target(response, current, hops)
                if following is None:
                    _check_response(response, self.settings)
                    body = _Body(self.settings)
                    async for chunk in response.aiter_raw():
                        body.add(chunk)
                    return bytes(body.buffer)
            current = following
        raise _refuse(f"The image URL redirected more than {MAX_REDIRECTS} times.")

    # threads (workers)

    def fetch_sync(self, url: str) -> bytes:
        """``fetch`` for threads. The deadline is checked between reads, so one blocked
        read can overrun it by at most its own timeout (the time left when its hop began)."""
        self._check_enabled()
        first = _parse_url(url)
        deadline = time.monotonic() + self.settings.image_fetch_timeout_s
        try:
            return self._fetch_sync(first, deadline)
        except TimeoutError:
            raise self._timed_out() from None
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self._timed_out()) from None

    def _fetch_sync(self, current: httpx.URL, deadline: float) -> bytes:
        for hops in range(MAX_REDIRECTS + 1):
            if time.monotonic() > deadline:
                raise TimeoutError
            hop = self._check_url(current)
            ip = hop.literal
            if ip is None:
                ip = self._pick(hop, self._lookup_before(hop, deadline))
            target = self._target(hop, ip)
            with (
                httpx.Client(**self._client_options(deadline)) as client,
                client.stream(
                    "GET", target.url, headers=target.headers, extensions=target.extensions
                ) as response,
            ):
                following = _redirect_target(response, current, hops)
                if following is None:
                    _check_response(response, self.settings)
                    body = _Body(self.settings)
                    for chunk in response.iter_raw():
                        body.add(chunk)
                        if time.monotonic() > deadline:
                            raise TimeoutError
                    return bytes(body.buffer)
            current = following
        raise _refuse(f"The image URL redirected more than {MAX_REDIRECTS} times.")

    def _lookup(self, hop: _Hop) -> Sequence[str]:
        try:
            return self._resolve(hop.host, hop.port)
        except (OSError, UnicodeError):
            raise _refuse(f"The image URL host {quote(hop.host)} could not be resolved.") from None

    def _lookup_before(self, hop: _Hop, deadline: float) -> Sequence[str]:
        """``_lookup`` in a pool thread, so a hanging resolver cannot pass the deadline."""
        global _dns_pool
        if _dns_pool is None:
            _dns_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="laneway-image-dns")
        future = _dns_pool.submit(self._lookup, hop)
        return future.result(timeout=max(deadline - time.monotonic(), 0.0))


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
            raise _refuse(_DISABLED)
        return "remote"
    if not scheme:
        raise _refuse(
            "Invalid image URL: expected a base64 data: URI (data:image/png;base64,...) "
            "or an http(s) URL."
        )
    raise _refuse(
        f"Unsupported image URL scheme {quote(scheme)}; use a base64 data: URI or an http(s) URL."
    )


def _decode_checked(url: str, settings: Settings) -> tuple[bytes, ImageInfo]:
    data = decode_data_uri(url, settings)
    return data, check_image(data, settings)


def _with_param(exc: InvalidRequest, param: str) -> InvalidRequest:
    exc.param = param
    return exc


async def resolve_image_url(
    url: str, settings: Settings, fetcher: ImageFetcher | None = None, *, param: str = PARAM
) -> tuple[bytes, ImageInfo]:
    """One ``image_url.url`` of a chat message -> checked bytes and what they are.

    Decoding runs in a thread, so a large image does not hold up the event loop."""
    try:
        if _route(url, settings) == "data":
            return await asyncio.to_thread(_decode_checked, url, settings)
        data = await (fetcher or ImageFetcher(settings)).fetch(url)
        return data, await asyncio.to_thread(check_image, data, settings)
    except InvalidRequest as exc:
        raise _with_param(exc, param) from None


def resolve_image_url_sync(
    url: str, settings: Settings, fetcher: ImageFetcher | None = None, *, param: str = PARAM
) -> tuple[bytes, ImageInfo]:
    """``resolve_image_url`` for threads (workers running Batch API lines)."""
    try:
        if _route(url, settings) == "data":
            return _decode_checked(url, settings)
        data = (fetcher or ImageFetcher(settings)).fetch_sync(url)
        return data, check_image(data, settings)
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
