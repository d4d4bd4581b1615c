"""tasks/media/images.py and tasks/media/image_fetch.py: data: URIs, image checks, the guarded
fetcher, the wire form.

The fetcher tests run a local ``http.server`` on 127.0.0.1 and map made-up ``.test``
names to it through an injected resolver; the loopback switch lets 127.0.0.1 through and
nothing else. No test touches the network or real DNS.
"""

from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import random
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from configs.settings import Settings
from tasks.errors import InvalidRequest
from tasks.filestore import get_file_store
from tasks.media import images
from tasks.media.image_fetch import ImageFetcher, address_problem, host_allowed
from tasks.media.images import (
    ImageInfo,
    check_image,
    decode_data_uri,
    from_wire,
    release,
    resolve_image_url,
    resolve_image_url_sync,
    to_wire,
)

# -- helpers -----------------------------------------------------------------------------------


def make_image(fmt: str = "PNG", size: tuple[int, int] = (8, 6), noise: bool = False) -> bytes:
    img = Image.new("RGB", size, (200, 30, 90))
    if noise:
        pixels = random.Random(0).randbytes(3 * size[0] * size[1])
        img = Image.frombytes("RGB", size, pixels)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height``, with almost no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def data_uri(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def settings(**kw: Any) -> Settings:
    values: dict[str, Any] = {"image_fetch": True, "image_fetch_hosts": ["images.test"]}
    values.update(kw)
    return Settings(**values)


def refused(call: Callable[[], object], *fragments: str) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        call()
    for fragment in fragments:
        assert fragment in info.value.message, info.value.message
    assert info.value.status_code == 400
    return info.value


PNG = make_image()

# -- data: URIs -------------------------------------------------------------------------------


def test_data_uri_round_trip() -> None:
    assert decode_data_uri(data_uri(PNG), settings()) == PNG
    assert decode_data_uri(data_uri(PNG, "IMAGE/JPG"), settings()) == PNG


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("data:image/png;base64,!!!!", "valid base64"),
        ("data:image/png;base64,abc", "valid base64"),
        ("data:image/png;base64,", "no data"),
        ("data:image/png;base64", "expected data:image"),
        ("data:image/png,rawbytes", "must be base64-encoded"),
        ("data:text/plain;base64,aGVsbG8=", "Unsupported media type 'text/plain'"),
        ("data:image/svg+xml;base64,PHN2Zz4=", "Unsupported media type 'image/svg+xml'"),
        ("data:;base64,aGVsbG8=", "Unsupported media type"),
        ("https://images.test/x.png", "not a data: URI"),
    ],
)
def test_bad_data_uris(uri: str, fragment: str) -> None:
    refused(lambda: decode_data_uri(uri, settings()), fragment)


def test_oversized_data_uri_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_: Any, **__: Any) -> bytes:
        raise AssertionError("decoded an oversized payload")

    monkeypatch.setattr(images.base64, "b64decode", boom)
    uri = "data:image/png;base64," + "A" * 8192
    refused(lambda: decode_data_uri(uri, settings(image_max_bytes=4096)), "4096 bytes")


def test_data_uri_just_over_the_limit() -> None:
    s = settings(image_max_bytes=1024)
    assert len(decode_data_uri(data_uri(b"x" * 1024), s)) == 1024
    # 1025 bytes encode to the same 1368 characters as 1026: caught after decoding
    refused(lambda: decode_data_uri(data_uri(b"x" * 1025), s), "1024 bytes")


# -- check_image ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "name"), [("PNG", "png"), ("JPEG", "jpeg"), ("WEBP", "webp"), ("GIF", "gif")]
)
def test_check_image_formats(fmt: str, name: str) -> None:
    assert check_image(make_image(fmt, (12, 5)), settings()) == ImageInfo(name, 12, 5)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "empty"),
        (b"not an image at all" * 10, "not a PNG, JPEG, WebP or GIF"),
        (make_image("BMP"), "not a PNG, JPEG, WebP or GIF"),
        (make_image("PNG", (64, 64), noise=True)[:600], "truncated or corrupt"),
        (make_image("JPEG", (64, 64), noise=True)[:700], "truncated or corrupt"),
    ],
)
def test_check_image_refusals(data: bytes, fragment: str) -> None:
    refused(lambda: check_image(data, settings()), fragment)


def test_check_image_byte_limit() -> None:
    data = make_image("PNG", (64, 64), noise=True)
    assert len(data) > 1024
    refused(lambda: check_image(data, settings(image_max_bytes=1024)), "1024 bytes")


def test_check_image_pixel_limit() -> None:
    s = settings(image_max_pixels=5000)
    assert check_image(make_image("PNG", (50, 100)), s).width == 50
    refused(lambda: check_image(make_image("PNG", (50, 101)), s), "(50x101)", "5000 pixels")


@pytest.mark.parametrize("side", [5000, 100_000])
def test_decompression_bomb_header_is_refused(side: int) -> None:
    # 5000^2 passes Pillow's own guard and is caught by ours; 100000^2 trips Pillow's
    refused(lambda: check_image(png_header_only(side, side), settings()), "more pixels")


def test_pillow_guard_is_switched_back_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    s = settings(image_max_pixels=10_000)
    refused(lambda: check_image(png_header_only(100_000, 100_000), s), "more pixels")
    assert Image.MAX_IMAGE_PIXELS == 10_000


# -- addresses and hosts ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "label"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.255", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "cloud metadata"),
        ("169.254.1.1", "link-local"),
        ("100.100.100.200", "cloud metadata"),
        ("168.63.129.16", "cloud metadata"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("255.255.255.255", "reserved"),
        ("198.18.0.1", "reserved"),
        ("::", "unspecified"),
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("fc00::1", "private"),
        ("fd00:ec2::254", "cloud metadata"),
        ("ff02::1", "multicast"),
        ("::ffff:127.0.0.1", "loopback (inside an IPv6 address)"),
        ("::ffff:10.0.0.1", "private (inside an IPv6 address)"),
        ("::ffff:169.254.169.254", "cloud metadata (inside an IPv6 address)"),
        ("2002:7f00:1::", "loopback (inside an IPv6 address)"),
        ("2002:a9fe:a9fe::", "cloud metadata (inside an IPv6 address)"),
        ("64:ff9b::7f00:1", "loopback (inside an IPv6 address)"),
        ("64:ff9b::a00:1", "private (inside an IPv6 address)"),
        ("64:ff9b:1::1", "NAT64 local-use"),
        ("2001::1", "Teredo"),
        ("2001:db8::1", "documentation"),
        ("203.0.113.9", "documentation"),
        ("192.0.0.10", "reserved"),
        ("::127.0.0.1", "reserved"),
    ],
)
def test_address_problem(address: str, label: str) -> None:
    assert address_problem(ipaddress.ip_address(address)) == label


@pytest.mark.parametrize(
    "address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"]
)
def test_public_addresses_pass(address: str) -> None:
    assert address_problem(ipaddress.ip_address(address)) is None


def test_host_allowed() -> None:
    allow = ["images.test", ".cdn.example", " Upper.Example. "]
    assert host_allowed("images.test", allow)
    assert host_allowed("a.cdn.example", allow)
    assert host_allowed("a.b.cdn.example", allow)
    assert host_allowed("upper.example", allow)
    assert not host_allowed("cdn.example", allow)  # '.domain' means its subdomains only
    assert not host_allowed("evilcdn.example", allow)
    assert not host_allowed("images.test.evil", allow)
    assert not host_allowed("x.images.test", allow)
    assert not host_allowed("anything", [])
    assert not host_allowed("anything", ["."])


# -- the fetcher: refusals before any connection ----------------------------------------------

MODES = ["async", "sync"]


def fetch(fetcher: ImageFetcher, url: str, mode: str) -> bytes:
    if mode == "async":
        return asyncio.run(fetcher.fetch(url))
    return fetcher.fetch_sync(url)


@dataclass
class FakeDNS:
    answers: dict[str, list[str]] = field(default_factory=dict)
    calls: list[tuple[str, int]] = field(default_factory=list)

    def __call__(self, host: str, port: int) -> Sequence[str]:
        self.calls.append((host, port))
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.answers[host]


def dns() -> FakeDNS:
    return FakeDNS(
        {
            "images.test": ["127.0.0.1"],
            "other.test": ["127.0.0.1"],
            "internal.test": ["10.1.2.3"],
            "metadata.test": ["169.254.169.254"],
            "mixed.test": ["93.184.216.34", "10.0.0.5"],
            "v6.test": ["2606:4700:4700::1111", "::1"],
        }
    )


@pytest.mark.parametrize("mode", MODES)
def test_fetching_off(mode: str) -> None:
    off = Settings()
    assert off.image_fetch is False
    refused(lambda: fetch(ImageFetcher(off), "https://images.test/x.png", mode), "disabled")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("file:///etc/passwd", "scheme 'file'"),
        ("ftp://images.test/x.png", "scheme 'ftp'"),
        ("gopher://images.test/x", "scheme 'gopher'"),
        ("http://user:pw@images.test/x.png", "user name or password"),
        ("http://images.test\\@evil.test/x.png", "user name or password"),
        ("http:///x.png", "no host"),
        ("http://images.test:99999/x.png", "not a valid port"),
        ("http://127.0.0.1/x.png", "is a loopback address"),
        ("http://127.0.0.1:8080/x.png", "is a loopback address"),
        ("http://10.0.0.1/x.png", "is a private address"),
        ("http://192.168.0.10/x.png", "is a private address"),
        ("http://169.254.169.254/latest/meta-data/", "is a cloud metadata address"),
        ("http://[::1]/x.png", "is a loopback address"),
        ("http://[::ffff:7f00:1]/x.png", "loopback (inside an IPv6 address)"),
        ("http://[fd00:ec2::254]/x.png", "cloud metadata"),
        ("http://0x7f000001/x.png", "not a valid host name"),
        ("http://2130706433/x.png", "not a valid host name"),
        ("http://127.1/x.png", "not a valid host name"),
        ("http://0177.0.0.1/x.png", "not a valid URL"),
        ("http://evil.example/x.png", "'evil.example' is not in this server's list"),
        ("http://x.images.test/x.png", "not in this server's list"),
        ("http://images.test/x.png", "resolves to a loopback address"),
        ("http://internal.test/x.png", "resolves to a private address"),
        ("http://metadata.test/x.png", "resolves to a cloud metadata address"),
        ("http://mixed.test/x.png", "resolves to a private address"),
        ("http://v6.test/x.png", "resolves to a loopback address"),
        ("http://nowhere.test/x.png", "could not be resolved"),
    ],
)
def test_fetch_refusals(url: str, fragment: str, mode: str) -> None:
    hosts = [
        "images.test",
        "internal.test",
        "metadata.test",
        "mixed.test",
        "v6.test",
        "nowhere.test",
        "127.0.0.1",
        "10.0.0.1",
    ]
    # no loopback switch here: a name that resolves to 127.0.0.1 is refused
    fetcher = ImageFetcher(settings(image_fetch_hosts=hosts), resolve=dns())
    error = refused(lambda: fetch(fetcher, url, mode), fragment)
    assert "10.0.0.5" not in error.message  # the address a name resolved to stays private


@pytest.mark.parametrize("mode", MODES)
def test_empty_allowlist_allows_no_host(mode: str) -> None:
    fetcher = ImageFetcher(settings(image_fetch_hosts=[]), resolve=dns())
    refused(lambda: fetch(fetcher, "https://images.test/x.png", mode), "no host is allowed")


@pytest.mark.parametrize(
    "url", ["http://internal.test/", "http://metadata.test/", "http://[::ffff:7f00:1]/"]
)
def test_the_loopback_switch_lets_only_loopback_through(url: str) -> None:
    fetcher = ImageFetcher(
        settings(image_fetch_hosts=["internal.test", "metadata.test"]),
        resolve=dns(),
        allow_loopback_for_tests=True,
    )
    refused(lambda: fetcher.fetch_sync(url), "address")


def test_settings_have_no_loopback_switch() -> None:
    assert not [name for name in Settings.model_fields if "loopback" in name]


# -- the fetcher against a local server -------------------------------------------------------

Handler = Callable[[BaseHTTPRequestHandler], None]


def _send(req: BaseHTTPRequestHandler, status: int, body: bytes = b"", **headers: str) -> None:
    req.send_response(status)
    for name, value in headers.items():
        req.send_header(name.replace("_", "-"), value)
    if "Content_Length" not in headers:
        req.send_header("Content-Length", str(len(body)))
    req.end_headers()
    req.wfile.write(body)


def _stream(req: BaseHTTPRequestHandler, pieces: Iterator[bytes], pause: float = 0.0) -> None:
    req.send_response(200)
    req.send_header("Content-Type", "image/png")
    req.end_headers()  # no Content-Length: the body ends when the connection closes
    try:
        for piece in pieces:
            req.wfile.write(piece)
            req.wfile.flush()
            time.sleep(pause)
    except OSError:
        pass  # the client stopped reading, as it should


@dataclass
class LocalServer:
    port: int
    seen: list[dict[str, str]]
    sni: list[str | None]
    scheme: str = "http"
    routes: dict[str, Handler] = field(default_factory=dict)  # tests may add their own

    def url(self, path: str, host: str = "images.test") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"


def _slow(req: BaseHTTPRequestHandler) -> None:
    time.sleep(3)
    _send(req, 200, PNG)


def _routes(port: int) -> dict[str, Handler]:
    big = make_image("PNG", (64, 64), noise=True)
    return {
        "/ok.png": lambda r: _send(r, 200, PNG, Content_Type="image/png"),
        "/big.png": lambda r: _send(r, 200, big, Content_Type="image/png"),
        "/to-ok": lambda r: _send(r, 302, Location="/ok.png"),
        "/to-ok-twice": lambda r: _send(r, 301, Location="/to-ok"),
        "/loop": lambda r: _send(r, 302, Location="/loop"),
        "/to-private": lambda r: _send(r, 302, Location="http://10.0.0.1/x"),
        "/to-metadata": lambda r: _send(r, 307, Location="http://169.254.169.254/latest/"),
        "/to-internal": lambda r: _send(r, 302, Location=f"http://internal.test:{port}/ok.png"),
        "/to-file": lambda r: _send(r, 302, Location="file:///etc/passwd"),
        "/to-elsewhere": lambda r: _send(r, 302, Location="https://evil.example/x.png"),
        "/no-location": lambda r: _send(r, 302),
        "/missing": lambda r: _send(r, 404, b"no"),
        "/error": lambda r: _send(r, 503, b"down"),
        "/garbage": lambda r: _send(r, 200, b"<html>not an image</html>" * 4),
        "/bomb.png": lambda r: _send(r, 200, png_header_only(100_000, 100_000)),
        "/gzip": lambda r: _send(r, 200, zlib.compress(PNG), Content_Encoding="gzip"),
        "/huge-header": lambda r: _send(r, 200, b"x" * 10, Content_Length=str(10**9)),
        "/huge-stream": lambda r: _stream(r, (b"x" * 4096 for _ in range(64))),
        "/slow": _slow,
        "/drip": lambda r: _stream(r, (b"x" for _ in range(100)), pause=0.05),
    }


def _serve(ssl_context: ssl.SSLContext | None = None) -> Iterator[LocalServer]:
    seen: list[dict[str, str]] = []
    sni: list[str | None] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
            route = routes.get(self.path)
            if route is None:
                _send(self, 404)
            else:
                route(self)

        def log_message(self, *args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # a client that gave up (the timeout tests) breaks the pipe: expected

    server = Server(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    if ssl_context is not None:

        def record(sock: ssl.SSLObject | ssl.SSLSocket, name: str | None, _: Any) -> None:
            sni.append(name)

        ssl_context.sni_callback = record  # type: ignore[assignment]
        server.socket = ssl_context.wrap_socket(server.socket, server_side=True)
    port = server.server_address[1]
    routes = _routes(port)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield LocalServer(port, seen, sni, "https" if ssl_context else "http", routes)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def server() -> Iterator[LocalServer]:
    yield from _serve()


def local_fetcher(**kw: Any) -> ImageFetcher:
    values: dict[str, Any] = {"image_fetch_hosts": ["images.test", "internal.test"]}
    values.update(kw)
    return ImageFetcher(settings(**values), resolve=dns(), allow_loopback_for_tests=True)


@pytest.mark.parametrize("mode", MODES)
def test_good_fetch_is_pinned_to_the_checked_address(server: LocalServer, mode: str) -> None:
    fetcher = local_fetcher()
    resolver = fetcher._resolve
    assert isinstance(resolver, FakeDNS)
    # images.test exists only in the fake resolver: reaching the server at all shows the
    # request went to the address that was checked, not to a second lookup of the name
    assert fetch(fetcher, server.url("/ok.png"), mode) == PNG
    assert resolver.calls == [("images.test", server.port)]
    assert server.seen[-1]["host"] == f"images.test:{server.port}"
    assert server.seen[-1]["accept-encoding"] == "identity"


@pytest.mark.parametrize("mode", MODES)
def test_redirects_are_followed_and_rechecked(server: LocalServer, mode: str) -> None:
    assert fetch(local_fetcher(), server.url("/to-ok-twice"), mode) == PNG
    assert [s["path"] for s in server.seen] == ["/to-ok-twice", "/to-ok", "/ok.png"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("/to-private", "'10.0.0.1' is a private address"),
        ("/to-metadata", "'169.254.169.254' is a cloud metadata address"),
        ("/to-internal", "'internal.test' resolves to a private address"),
        ("/to-file", "scheme 'file'"),
        ("/to-elsewhere", "'evil.example' is not in this server's list"),
        ("/loop", "redirected more than 3 times"),
        ("/no-location", "HTTP 302 without a Location"),
        ("/missing", "HTTP 404 Not Found"),
        ("/error", "HTTP 503"),
        ("/gzip", "Content-Encoding: 'gzip'"),
        ("/huge-header", "the server announced 1000000000 bytes"),
    ],
)
def test_fetch_refusals_from_the_server(
    server: LocalServer, path: str, fragment: str, mode: str
) -> None:
    refused(lambda: fetch(local_fetcher(), server.url(path), mode), fragment)


@pytest.mark.parametrize("mode", MODES)
def test_redirect_to_a_private_address_is_not_requested(server: LocalServer, mode: str) -> None:
    fetcher = local_fetcher(image_fetch_hosts=["images.test", "internal.test"])
    refused(lambda: fetch(fetcher, server.url("/to-internal"), mode), "private")
    assert [s["path"] for s in server.seen] == ["/to-internal"]


@pytest.mark.parametrize("mode", MODES)
def test_streamed_body_over_the_limit(server: LocalServer, mode: str) -> None:
    fetcher = local_fetcher(image_max_bytes=8192)
    error = refused(lambda: fetch(fetcher, server.url("/huge-stream"), mode), "8192 bytes")
    assert "announced" not in error.message


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path", ["/slow", "/drip"])
def test_total_time_limit(server: LocalServer, path: str, mode: str) -> None:
    fetcher = local_fetcher(image_fetch_timeout_s=0.4)
    start = time.monotonic()
    refused(lambda: fetch(fetcher, server.url(path), mode), "Timed out", "0.4 s")
    # well short of the 3 s /slow and 5 s /drip take, with room for a loaded machine
    assert time.monotonic() - start < 2.5


@pytest.mark.parametrize("mode", MODES)
def test_connection_refused(mode: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        refused(
            lambda: fetch(local_fetcher(), f"http://images.test:{port}/x.png", mode),
            "Could not connect",
        )


# -- resolve_image_url ------------------------------------------------------------------------


def resolve(url: str, s: Settings, fetcher: ImageFetcher | None, mode: str) -> Any:
    if mode == "async":
        return asyncio.run(resolve_image_url(url, s, fetcher))
    return resolve_image_url_sync(url, s, fetcher)


@pytest.mark.parametrize("mode", MODES)
def test_resolve_data_uri(mode: str) -> None:
    off = Settings()
    assert resolve(data_uri(PNG), off, None, mode) == (PNG, ImageInfo("png", 8, 6))


@pytest.mark.parametrize("mode", MODES)
def test_resolve_remote(server: LocalServer, mode: str) -> None:
    fetcher = local_fetcher()
    data, info = resolve(server.url("/ok.png"), fetcher.settings, fetcher, mode)
    assert (data, info) == (PNG, ImageInfo("png", 8, 6))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("path", "fragment"),
    [("/garbage", "not a PNG, JPEG, WebP or GIF"), ("/bomb.png", "more pixels")],
)
def test_resolve_remote_checks_the_content(
    server: LocalServer, path: str, fragment: str, mode: str
) -> None:
    fetcher = local_fetcher()
    refused(lambda: resolve(server.url(path), fetcher.settings, fetcher, mode), fragment)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("url", "s", "fragment"),
    [
        ("https://images.test/x.png", Settings(), "Remote image URLs are disabled"),
        ("http://images.test/x.png", Settings(), "data: URI"),
        ("file:///etc/passwd", Settings(), "scheme 'file'"),
        ("file:///etc/passwd", settings(), "scheme 'file'"),
        ("gopher:x", settings(), "scheme 'gopher'"),
        ("/etc/passwd", settings(), "expected a base64 data: URI"),
        ("data:image/png;base64,@@", Settings(), "valid base64"),
    ],
)
def test_resolve_refusals(url: str, s: Settings, fragment: str, mode: str) -> None:
    error = refused(lambda: resolve(url, s, None, mode), fragment)
    assert error.param == "messages"


def test_resolve_names_the_callers_param() -> None:
    param = "messages.[0].content.[1].image_url.url"
    with pytest.raises(InvalidRequest) as info:
        resolve_image_url_sync("file:///etc/passwd", Settings(), param=param)
    assert info.value.param == param
    with pytest.raises(InvalidRequest) as info:
        asyncio.run(resolve_image_url("data:image/png;base64,@@", Settings(), param=param))
    assert info.value.param == param


# -- https: SNI and certificate checked against the name, not the pinned IP -------------------


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", "/CN=images.test",
            "-addext", "subjectAltName=DNS:images.test", "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture
def tls_server(tls_files: tuple[Path, Path]) -> Iterator[LocalServer]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*tls_files)
    yield from _serve(context)


@pytest.mark.parametrize("mode", MODES)
def test_https_sends_the_name_in_sni_and_checks_the_certificate(
    tls_server: LocalServer, tls_files: tuple[Path, Path], mode: str
) -> None:
    fetcher = ImageFetcher(
        settings(image_fetch_hosts=["images.test", "other.test"]),
        resolve=dns(),
        allow_loopback_for_tests=True,
        ssl_context=ssl.create_default_context(cafile=str(tls_files[0])),
    )
    assert fetch(fetcher, tls_server.url("/ok.png"), mode) == PNG
    assert tls_server.sni == ["images.test"]
    assert tls_server.seen[-1]["host"] == f"images.test:{tls_server.port}"
    # same address, a name the certificate does not cover: the TLS check refuses it
    refused(lambda: fetch(fetcher, tls_server.url("/ok.png", "other.test"), mode), "TLS")


def tls_fetcher(tls_files: tuple[Path, Path]) -> ImageFetcher:
    return ImageFetcher(
        settings(image_fetch_hosts=["images.test"]),
        resolve=dns(),
        allow_loopback_for_tests=True,
        ssl_context=ssl.create_default_context(cafile=str(tls_files[0])),
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path", ["/to-plain", "/to-to-plain"])
def test_a_redirect_from_https_to_http_is_refused(
    tls_server: LocalServer,
    server: LocalServer,
    tls_files: tuple[Path, Path],
    path: str,
    mode: str,
) -> None:
    """A downgrade would send the request, and take the image, in the clear: the plain
    server is never asked, whichever hop of the chain downgrades."""
    tls_server.routes["/to-plain"] = lambda r: _send(r, 302, Location=server.url("/ok.png"))
    tls_server.routes["/to-to-plain"] = lambda r: _send(r, 301, Location="/to-plain")
    error = refused(
        lambda: fetch(tls_fetcher(tls_files), tls_server.url(path), mode),
        "redirected from https to plain http",
    )
    assert error.param == "messages"
    assert server.seen == []


@pytest.mark.parametrize("mode", MODES)
def test_redirects_to_https_are_followed(
    tls_server: LocalServer, server: LocalServer, tls_files: tuple[Path, Path], mode: str
) -> None:
    """http -> https (an upgrade) and https -> https are fine."""
    server.routes["/to-tls"] = lambda r: _send(r, 302, Location=tls_server.url("/to-ok"))
    fetcher = tls_fetcher(tls_files)
    assert fetch(fetcher, server.url("/to-tls"), mode) == PNG
    assert [s["path"] for s in server.seen] == ["/to-tls"]
    assert [s["path"] for s in tls_server.seen] == ["/to-ok", "/ok.png"]
    assert fetch(fetcher, tls_server.url("/to-ok"), mode) == PNG


# -- wire form --------------------------------------------------------------------------------


def test_wire_inline(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path)
    store = get_file_store(s)
    wire = to_wire(PNG, check_image(PNG, s), store, s)
    assert set(wire) == {"b64", "format"}
    assert wire["format"] == "png"
    assert from_wire(wire, store) == PNG
    release(wire, store)
    assert store.listdir("images") == []


def test_wire_by_reference(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path, image_inline_max_bytes=len(PNG) - 1)
    store = get_file_store(s)
    wire = to_wire(PNG, check_image(PNG, s), store, s)
    assert set(wire) == {"ref", "format"}
    assert wire["ref"].startswith("images/")
    assert store.exists(wire["ref"])
    assert from_wire(wire, store) == PNG
    other = to_wire(PNG, check_image(PNG, s), store, s)
    assert other["ref"] != wire["ref"]
    release(wire, store)
    assert not store.exists(wire["ref"])
    assert store.exists(other["ref"])
    release(wire, store)  # twice is harmless


@pytest.mark.parametrize("ref", ["batches/input.jsonl", "images/../x", "../images/x", None])
def test_from_wire_reads_only_image_refs(tmp_path: Path, ref: Any) -> None:
    store = get_file_store(Settings(data_dir=tmp_path))
    with pytest.raises(ValueError):
        from_wire({"ref": ref, "format": "png"}, store)
    with pytest.raises(ValueError):
        release({"ref": ref, "format": "png"}, store)
