"""Image and URI intake: hostile inputs are refused with a message that names the problem."""
from __future__ import annotations

import http.server
import io
import struct
import threading
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from PIL import Image

from mmsearch.captioner.v1 import captioner_pb2, captioner_pb2_grpc
from mmsearch.common.v1 import types_pb2
from services.common.errors import InvalidInput
from services.common.images import decode_image
from services.common.server import RunningServer, start_server
from services.common.settings import ImageLimits, UriSettings
from services.common.uris import UriFetcher
from tests.common.runtime_app import RuntimeTestSettings, make_app
from tests.conftest import jpeg_bytes, png_bytes


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


BAD_IMAGES = {
    "truncated jpeg": (jpeg_bytes(256, 256)[:300], "truncated"),
    "zero bytes": (b"", "empty"),
    "not an image": (b"%PDF-1.4 definitely not an image" * 4, "not a recognised image"),
    "png bomb 50000x50000": (png_declaring(50_000, 50_000), "pixel"),
    "oversize payload": (png_bytes() + b"\x00" * (2 * 1024 * 1024), "more than the limit"),
}
LIMITS = ImageLimits(max_bytes=1024 * 1024)


@pytest.mark.parametrize("name", BAD_IMAGES)
def test_decode_rejects(name: str) -> None:
    data, reason = BAD_IMAGES[name]
    with pytest.raises(InvalidInput, match=reason):
        decode_image(data, LIMITS)


def test_decode_applies_exif_orientation_and_converts_to_rgb() -> None:
    img = Image.new("L", (40, 20), 128)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    decoded = decode_image(buf.getvalue(), LIMITS)
    assert (decoded.width, decoded.height) == (20, 40)
    assert decoded.image.mode == "RGB" and decoded.format == "JPEG" and len(decoded.sha256) == 64


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[RunningServer]:
    settings = RuntimeTestSettings(
        host="127.0.0.1", grpc_port=0, metrics_port=-1, images=LIMITS, uris=UriSettings(file_root=tmp_path)
    )
    server = await start_server(settings, make_app(settings))
    yield server
    await server.stop(0.5)


async def test_bad_images_are_invalid_argument_over_grpc(running: RunningServer) -> None:
    async with grpc.aio.insecure_channel(running.address) as channel:
        stub = captioner_pb2_grpc.CaptionerStub(channel)
        for name, (data, reason) in BAD_IMAGES.items():
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Caption(captioner_pb2.CaptionRequest(image=types_pb2.Image(data=data)))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
            assert reason in (err.value.details() or ""), (name, err.value.details())
        # The server is still up and serves a good image.
        ok = await stub.Caption(captioner_pb2.CaptionRequest(image=types_pb2.Image(data=png_bytes())))
        assert ok.caption.description == "32x24 PNG"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    inside = tmp_path / "root"
    (inside / "sub").mkdir(parents=True)
    (inside / "sub" / "ok.png").write_bytes(png_bytes())
    (tmp_path / "secret.png").write_bytes(png_bytes())
    (inside / "escape.png").symlink_to(tmp_path / "secret.png")
    (inside / "inner-link.png").symlink_to(inside / "sub" / "ok.png")
    return inside


async def test_file_uris_are_confined_to_the_root(root: Path) -> None:
    fetcher = UriFetcher(UriSettings(file_root=root), max_bytes=1024 * 1024)
    assert await fetcher.fetch(f"file://{root}/sub/ok.png") == png_bytes()
    assert await fetcher.fetch(f"file://{root}/inner-link.png") == png_bytes()  # symlink staying inside
    refused = {
        f"file://{root}/../secret.png": "'..'",
        f"file://{root}/sub/%2e%2e/%2e%2e/secret.png": "'..'",
        f"file://{root}/escape.png": "outside the allowed root",
        "file:///etc/passwd": "outside the allowed root",
        f"file://{root}/missing.png": "not found",
        f"file://evil.example{root}/sub/ok.png": "must not name a host",
        "ftp://example.com/a.png": "unsupported URI scheme",
        "gopher://127.0.0.1:70/": "unsupported URI scheme",
        "data:image/png;base64,AAAA": "unsupported URI scheme",
    }
    for uri, reason in refused.items():
        with pytest.raises(InvalidInput, match=reason):
            await fetcher.fetch(uri)


async def test_file_uris_refused_without_root() -> None:
    with pytest.raises(InvalidInput, match="disabled"):
        await UriFetcher(UriSettings(), max_bytes=1024).fetch("file:///tmp/x.png")


@pytest.mark.parametrize(
    "uri",
    ["http://127.0.0.1/a.png", "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/a.png",
     "http://[::1]/a.png", "http://localhost/a.png", "https://192.168.1.1/a.png", "http://0.0.0.0/"],
)
async def test_http_to_private_addresses_refused(uri: str) -> None:
    fetcher = UriFetcher(UriSettings(allow_http=True), max_bytes=1024)
    with pytest.raises(InvalidInput, match="non-public address"):
        await fetcher.fetch(uri)


async def test_http_disabled_by_default() -> None:
    with pytest.raises(InvalidInput, match="remote URIs are disabled"):
        await UriFetcher(UriSettings(), max_bytes=1024).fetch("https://example.com/a.png")


@pytest.fixture
def http_server() -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/ok.png":
                body = png_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif self.path == "/to-metadata":
                self.send_response(302)
                self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
                self.end_headers()
            elif self.path == "/to-ok":
                self.send_response(301)
                self.send_header("Location", "/ok.png")
                self.end_headers()
            else:
                self.send_response(404)
                self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


async def test_http_redirects_are_rechecked(http_server: str) -> None:
    # Loopback is exempted for the test server only; the redirect target is not.
    fetcher = UriFetcher(UriSettings(allow_http=True, http_allowed_networks=["127.0.0.1/32"]), max_bytes=1024 * 1024)
    assert await fetcher.fetch(f"{http_server}/ok.png") == png_bytes()
    assert await fetcher.fetch(f"{http_server}/to-ok") == png_bytes()
    with pytest.raises(InvalidInput, match="non-public address"):
        await fetcher.fetch(f"{http_server}/to-metadata")
    with pytest.raises(InvalidInput, match="HTTP 404"):
        await fetcher.fetch(f"{http_server}/missing")
    small = UriFetcher(UriSettings(allow_http=True, http_allowed_networks=["127.0.0.1/32"]), max_bytes=10)
    with pytest.raises(InvalidInput, match="more than the limit"):
        await small.fetch(f"{http_server}/ok.png")
    await fetcher.aclose()
