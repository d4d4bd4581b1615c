"""Remote images in chat messages: the guarded fetcher.

Pure logic, no torch: the API process and the workers both import it.

``ImageFetcher`` fetches remote images only when ``settings.image_fetch`` is on, only
from ``settings.image_fetch_hosts``, never from loopback, private, link-local, metadata
or otherwise non-public addresses. It resolves each host itself, checks every address,
then connects to the address it checked (the URL carries the IP; ``Host`` and TLS SNI
carry the name), so a DNS answer that changes between check and connect cannot bypass
the check. Redirects are followed by hand, each hop checked again; one from https to
plain http is refused. It returns the body undecoded: ``tasks.media.images``
(``resolve_image_url``, ``check_image``) checks it.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx

from configs.settings import Settings
from tasks.errors import InvalidRequest, quote

# the parameter refusals name unless the caller passes a more precise one
PARAM = "messages"
MAX_REDIRECTS = 3
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
USER_AGENT = "laneway-image-fetch"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# (host, port) -> the addresses the host resolves to, as strings
Resolver = Callable[[str, int], Sequence[str]]

DISABLED_TEXT = (
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


# -- refusals (tasks.media.images raises them too) ---------------------------------------------


def _size_text(n: int) -> str:
    mib = 1024 * 1024
    return f"{n / mib:g} MiB" if n >= mib else f"{n} bytes"


def too_large(settings: Settings, detail: str = "") -> InvalidRequest:
    return InvalidRequest(
        f"The image is larger than this server's limit of "
        f"{_size_text(settings.image_max_bytes)} per image{detail}.",
        param=PARAM,
    )


def refuse(message: str) -> InvalidRequest:
    return InvalidRequest(message, param=PARAM)


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
        raise refuse("The image URL is not a valid URL.") from None


def _redirect_target(response: httpx.Response, current: httpx.URL, hops: int) -> httpx.URL | None:
    """The next URL when ``response`` is a redirect, else None."""
    if response.status_code not in REDIRECT_STATUSES:
        return None
    if hops >= MAX_REDIRECTS:
        raise refuse(f"The image URL redirected more than {MAX_REDIRECTS} times.")
    location = response.headers.get("location")
    if not location:
        raise refuse(
            f"Fetching the image URL failed: the server answered HTTP "
            f"{response.status_code} without a Location."
        )
    try:
        target = current.join(location)
    except (httpx.InvalidURL, TypeError, ValueError):
        raise refuse("The image URL redirected to an invalid URL.") from None
    if current.scheme == "https" and target.scheme == "http":
        # a downgrade: the next request, and the image, would cross the network in the
        # clear, open to being read or replaced on the way
        raise refuse(
            "The image URL redirected from https to plain http; this server does not "
            "follow redirects that drop TLS."
        )
    return target


def _check_response(response: httpx.Response, settings: Settings) -> None:
    """Status, encoding and announced length, before any of the body is read."""
    if not 200 <= response.status_code < 300:
        reason = f" {response.reason_phrase}" if response.reason_phrase else ""
        raise refuse(
            f"Fetching the image URL failed: the server answered HTTP "
            f"{response.status_code}{reason}."
        )
    encoding = response.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise refuse(
            f"The image URL answered with a compressed body (Content-Encoding: "
            f"{quote(encoding)}); this server only fetches uncompressed images."
        )
    length = response.headers.get("content-length", "")
    if length.strip().isdigit() and int(length) > settings.image_max_bytes:
        raise too_large(settings, f" (the server announced {int(length)} bytes)")


class _Body:
    """The body read so far, refused as soon as it passes the limit."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.buffer = bytearray()

    def add(self, chunk: bytes) -> None:
        if len(self.buffer) + len(chunk) > self.settings.image_max_bytes:
            raise too_large(self.settings)
        self.buffer += chunk


def _transport_error(exc: httpx.HTTPError, timed_out: InvalidRequest) -> InvalidRequest:
    if isinstance(exc, httpx.TimeoutException):
        return timed_out
    if isinstance(exc, httpx.ConnectError):
        return refuse("Could not connect to the image URL's host (connection or TLS error).")
    return refuse("Fetching the image URL failed: the connection broke off.")


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
            raise refuse(DISABLED_TEXT)

    def _check_url(self, url: httpx.URL) -> _Hop:
        """Everything about a URL that needs no DNS: scheme, userinfo, host, allowlist."""
        if url.scheme not in ("http", "https"):
            raise refuse(
                f"Unsupported image URL scheme {quote(url.scheme)}; use an http(s) URL "
                "or a base64 data: URI."
            )
        if url.userinfo:
            raise refuse("Image URLs must not contain a user name or password.")
        host = url.raw_host.decode("ascii").lower().rstrip(".")
        if not host:
            raise refuse("The image URL has no host.")
        port = url.port or (443 if url.scheme == "https" else 80)
        if not 0 < port < 65536:
            raise refuse(f"The image URL's port {port} is not a valid port.")
        literal = _parse_address(host) if ":" in host or host[-1].isdigit() else None
        if literal is None and _NUMERIC_LABEL.fullmatch(host.rsplit(".", 1)[-1]):
            raise refuse(
                f"The image URL host {quote(host)} is not a valid host name "
                "(write IP addresses in dotted decimal form)."
            )
        if literal is not None:
            self._check_address(host, literal, resolved=False)
        allowlist = self.settings.image_fetch_hosts
        if not allowlist:
            raise refuse(
                "Remote image URLs are enabled on this server, but no host is allowed "
                "(its image host list is empty); send the image as a base64 data: URI."
            )
        if not host_allowed(host, allowlist):
            raise refuse(
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
            raise refuse(
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
            raise refuse(f"The image URL host {quote(hop.host)} could not be resolved.")
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
        return refuse(
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
        raise refuse(f"The image URL redirected more than {MAX_REDIRECTS} times.")

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
        raise refuse(f"The image URL redirected more than {MAX_REDIRECTS} times.")

    def _lookup(self, hop: _Hop) -> Sequence[str]:
        try:
            return self._resolve(hop.host, hop.port)
        except (OSError, UnicodeError):
            raise refuse(f"The image URL host {quote(hop.host)} could not be resolved.") from None

    def _lookup_before(self, hop: _Hop, deadline: float) -> Sequence[str]:
        """``_lookup`` in a pool thread, so a hanging resolver cannot pass the deadline."""
        global _dns_pool
        if _dns_pool is None:
            _dns_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="laneway-image-dns")
        future = _dns_pool.submit(self._lookup, hop)
        return future.result(timeout=max(deadline - time.monotonic(), 0.0))
