"""Bad input -> INVALID_ARGUMENT naming the item and the problem; the server keeps serving."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import grpc
import pytest
from PIL import Image

from mmsearch.common.v1 import types_pb2
from mmsearch.embedder.v1 import embedder_pb2
from services.embedder.backends.clip import ClipBackend
from tests.embedder.conftest import composed, encode, image, make_settings, serve, text


def png_bomb(width: int = 8_000, height: int = 6_000) -> bytes:
    """A valid PNG header declaring 48 M pixels, above the 40 M default limit (the data is tiny)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def image_uri(uri: str) -> types_pb2.Content:
    return types_pb2.Content(image=types_pb2.Image(uri=uri))


GOOD = encode(Image.new("RGB", (48, 40), (10, 200, 30)), "JPEG")

CASES = [
    ("empty text", [text("ok"), text("ok"), text("")], "item 2: text is empty"),
    ("blank text", [text("   \n\t")], "item 0: text is empty"),
    (
        "1 MB text",
        [text("ok"), text("x" * 1_000_000)],
        "item 1: text is 1000000 characters, more than the limit of 2048",
    ),
    ("corrupt image", [image(GOOD), image(b"\xff\xd8\xff\xe0 this is not a jpeg")], "item 1:"),
    ("truncated image", [image(GOOD[: len(GOOD) // 2])], "item 0: image is corrupt or truncated"),
    ("empty image", [text("ok"), image(b"")], "item 1: image is empty"),
    ("decompression bomb", [image(png_bomb())], "item 0: image is 8000x6000 = 48000000 pixels, more than the limit"),
    (
        "composed without image",
        [text("ok"), types_pb2.Content(composed=types_pb2.Composed(instruction="in red"))],
        "item 1: composed query has no image",
    ),
    ("composed without instruction", [composed(GOOD, "")], "item 0: composed.instruction is empty"),
    (
        "composed weight out of range",
        [composed(GOOD, "in red", 1.5)],
        "item 0: composed.instruction_weight must be in [0, 1]",
    ),
    ("unset content", [text("ok"), types_pb2.Content()], "item 1: content is empty"),
    ("file uri without a file root", [image_uri("file:///etc/passwd")], "item 0: file:// URIs are disabled"),
    (
        "remote uri while disabled",
        [text("ok"), image_uri("http://169.254.169.254/latest")],
        "item 1: remote URIs are disabled",
    ),
]


async def test_each_bad_input_is_invalid_argument_naming_the_item(clip_backend: ClipBackend) -> None:
    settings = make_settings(backend="clip", max_batch_items=8)
    async with serve(settings, clip_backend) as served:
        for name, items, message in CASES:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await served.embed(*items)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
            assert message in caught.value.details(), (name, caught.value.details())
        # Batch-level problems.
        for items, message in (([], "items is empty"), ([text("a")] * 9, "too many items: 9, the limit is 8")):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await served.stub.Embed(embedder_pb2.EmbedRequest(items=items), timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in caught.value.details()
        # Still serving, and nothing was left admitted by the failed calls.
        reply = await served.embed(text("a cat"), image(GOOD), composed(GOOD, "in red"))
        assert len(reply.embeddings) == 3
        assert served.engine.batcher.depth == 0
        assert await served.health_status() == 1


async def test_file_uris_inside_the_root_are_read(clip_backend: ClipBackend, tmp_path: Path) -> None:
    (tmp_path / "photo.jpg").write_bytes(GOOD)
    settings = make_settings(backend="clip", uris={"file_root": tmp_path})
    async with serve(settings, clip_backend) as served:
        by_uri = await served.embed(image_uri(f"file://{tmp_path}/photo.jpg"))
        inline = await served.embed(image(GOOD))
        assert list(by_uri.embeddings[0].values) == list(inline.embeddings[0].values)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await served.embed(text("ok"), image_uri(f"file://{tmp_path}/../etc/passwd"))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details().startswith("item 1:")


async def test_the_configured_pixel_limit_is_the_only_one(clip_backend: ClipBackend) -> None:
    """Raised above Pillow's own 89.5 Mpx, our limit admits a 90 Mpx image; lowered, it
    refuses with a message naming IMAGES__MAX_PIXELS (never Pillow's limit)."""
    big = encode(Image.new("L", (9_500, 9_500), 90), "PNG")  # 90.25 Mpx, ~90 KB
    async with serve(make_settings(backend="clip", images={"max_pixels": 120_000_000}), clip_backend) as served:
        info = await served.stub.Info(embedder_pb2.InfoRequest())
        assert info.max_image_pixels == 120_000_000
        reply = await served.embed(image(big), timeout=60)
        assert len(reply.embeddings[0].values) == info.dimension
    async with serve(make_settings(backend="clip", images={"max_pixels": 50_000_000}), clip_backend) as served:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await served.embed(image(big), timeout=60)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details() == (
            "item 0: image is 9500x9500 = 90250000 pixels, more than the limit of 50000000 pixels (IMAGES__MAX_PIXELS)"
        )
        assert await served.health_status() == 1
