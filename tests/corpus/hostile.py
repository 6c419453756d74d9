"""The hostile-input corpus, generated (deterministically) instead of checked in as binaries.

`IMAGES` maps a case name to (bytes, expectation): either `OK` (a strange but valid image
that must be accepted) or a phrase the refusal message must contain. The reliability tests
send every case through every public RPC that takes an image; `python -m tests.corpus.hostile
DIR` writes them out as files (e.g. to seed a fuzzer).
"""
from __future__ import annotations

import io
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

OK = "OK"
MiB = 1024 * 1024


def _encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _photo(size: tuple[int, int] = (96, 64), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    return Image.fromarray(cells).resize(size, Image.Resampling.BILINEAR)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height: a decompression bomb's shape."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        _png_chunk(b"IEND", b"")


def gif_declaring(width: int, height: int) -> bytes:
    gif = bytearray(_encode(_photo((8, 8)).convert("P"), "GIF"))
    gif[6:10] = struct.pack("<HH", width, height)  # logical screen
    at = gif.index(b"\x2c")  # image descriptor
    gif[at + 5 : at + 9] = struct.pack("<HH", width, height)
    return bytes(gif)


def bmp_declaring(width: int, height: int) -> bytes:
    bmp = bytearray(_encode(_photo((4, 4)), "BMP"))
    bmp[18:26] = struct.pack("<ii", width, height)
    return bytes(bmp)


def corrupt_png() -> bytes:
    """A PNG whose image data was damaged in transit (CRC mismatch)."""
    png = bytearray(_encode(_photo(), "PNG"))
    at = png.index(b"IDAT") + 20
    png[at : at + 16] = bytes(16)
    return bytes(png)


def corrupt_gif() -> bytes:
    gif = bytearray(_encode(_photo().convert("P"), "GIF"))
    at = gif.index(b"\x2c") + 12
    gif[at:] = b"\xff" * (len(gif) - at)
    return bytes(gif)


def animated_gif() -> bytes:
    frames = [_photo(seed=s).convert("P") for s in range(4)]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)


def cmyk_jpeg() -> bytes:
    return _encode(_photo().convert("CMYK"), "JPEG", quality=90)


def png_16bit() -> bytes:
    grey = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    return _encode(Image.fromarray(grey), "PNG")  # uint16 -> mode I;16, saved as 16-bit PNG


def exif_bomb_jpeg() -> bytes:
    """A valid JPEG whose EXIF block says the orientation is 9999 (nonsense)."""
    exif = Image.Exif()
    exif[0x0112] = 9999
    return _encode(_photo(), "JPEG", exif=exif)


def _build() -> dict[str, tuple[bytes, str]]:
    jpeg = _encode(_photo(), "JPEG", quality=90)
    png = _encode(_photo(), "PNG")
    webp = _encode(_photo(), "WEBP", quality=80)
    gif = _encode(_photo().convert("P"), "GIF")
    return {
        "truncated jpeg": (jpeg[: len(jpeg) // 2], "truncated"),
        "jpeg header then garbage": (jpeg[:20] + b"\x13\x37" * 200, "not a recognised image"),
        "truncated png": (png[: len(png) // 2], "truncated"),
        "corrupt png (bad crc)": (corrupt_png(), "corrupt"),
        "truncated webp": (webp[: len(webp) // 2], "corrupt"),
        "webp header only": (webp[:30], "corrupt"),
        "truncated gif": (gif[:40], "not a recognised image"),
        "corrupt gif": (corrupt_gif(), "corrupt"),
        "zero bytes": (b"", "empty"),
        "one zero byte": (b"\0", "not a recognised image"),
        "pdf": (b"%PDF-1.7\n" + b"1 0 obj << >> endobj\n" * 20, "not a recognised image"),
        "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="1e9" height="1e9"></svg>', "not a recognised image"),
        "png bomb 50000x50000": (png_declaring(50_000, 50_000), "pixel"),
        "gif bomb 65535x65535": (gif_declaring(65_535, 65_535), "pixel"),
        "bmp bomb 40000x40000": (bmp_declaring(40_000, 40_000), "pixel"),
        "png zero width": (png_declaring(0, 10), "not a recognised image"),
        "ppm (format not allowed)": (_encode(_photo(), "PPM"), "not allowed"),
        "21 MiB payload over the image limit": (png + bytes(21 * MiB), "more than the limit"),
        "1 pixel": (_encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), OK),
        "cmyk jpeg": (cmyk_jpeg(), OK),
        "16-bit png": (png_16bit(), OK),
        "animated gif": (animated_gif(), OK),
        "nonsense exif orientation": (exif_bomb_jpeg(), OK),
        "1x4000 strip": (_encode(Image.new("RGB", (1, 4000), (1, 2, 3)), "PNG"), OK),
    }


IMAGES: dict[str, tuple[bytes, str]] = _build()


def write(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, (data, _) in IMAGES.items():
        (folder / (name.replace(" ", "_").replace("/", "_") + ".bin")).write_bytes(data)


if __name__ == "__main__":
    write(Path(sys.argv[1] if len(sys.argv) > 1 else "corpus-out"))
