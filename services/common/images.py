"""Image intake: decode untrusted bytes safely, or fail with a message naming the problem.

Three defences, in order:
- the declared size from the header is checked against `IMAGES__MAX_PIXELS` *before*
  any pixel is decoded; that setting is the only pixel limit (Pillow's own
  MAX_IMAGE_PIXELS, 89.5 Mpx, is switched off below so an operator can raise ours and
  no message ever names Pillow's);
- decoding shrinks the image to what its consumer needs (`PixelNeed`): JPEG draft mode
  decodes at 1/2..1/8 scale straight from the DCT, other formats are `reduce`d in their
  own mode before the RGB copy (Pillow keeps RGB as 4 bytes a pixel: a 36 Mpx RGB copy
  alone is 144 MiB);
- a process-wide pixel budget (`IMAGES__MAX_DECODING_PIXELS`) bounds how many pixels
  are being decoded at once, so 16 concurrent near-limit images queue instead of
  allocating 16 full frames.
"""
from __future__ import annotations

import hashlib
import io
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from services.common.errors import InvalidInput
from services.common.settings import ImageLimits

# Never let Pillow half-decode a truncated file into a grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Our limit replaces Pillow's (see the module docstring); it is checked before decoding.
Image.MAX_IMAGE_PIXELS = None

PIXEL_LIMIT_SETTING = "IMAGES__MAX_PIXELS"
# Shrink no further than this many times the size a consumer needs, so its own resize
# still has real pixels to average (Pillow's `reducing_gap` guidance: 2-3 is visually
# indistinguishable from a full-size resize).
REDUCING_GAP = 2.0
# Modes `Image.reduce` accepts; others (palette, 1-bit, 16-bit) are reduced in bands.
_REDUCIBLE = {"L", "LA", "RGB", "RGBA", "RGBa", "La", "I", "F", "CMYK", "YCbCr", "PA"}


@dataclass(frozen=True)
class PixelNeed:
    """The smallest image a consumer can use: decoding may shrink an image while its
    short side stays >= `short_side` * REDUCING_GAP and its long side >= `long_side` *
    REDUCING_GAP. Zero means "no constraint" on that side; PixelNeed() means any size."""

    short_side: int = 0
    long_side: int = 0

    def factor(self, width: int, height: int) -> int:
        """The whole-number shrink factor this need allows for an image of that size."""
        limits = []
        if self.short_side:
            limits.append(min(width, height) / (self.short_side * REDUCING_GAP))
        if self.long_side:
            limits.append(max(width, height) / (self.long_side * REDUCING_GAP))
        best = min(limits) if limits else max(width, height) / REDUCING_GAP
        return max(1, math.floor(best))


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # RGB, EXIF orientation applied, possibly shrunk (see PixelNeed)
    format: str
    width: int  # of `image`
    height: int
    sha256: str  # of the encoded bytes: the content-hash id
    # The size the file declares (before any shrinking and before EXIF rotation).
    source_size: tuple[int, int] = (0, 0)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class PixelBudget:
    """A counting semaphore over pixels shared by every decoding thread of a process."""

    def __init__(self, pixels: int) -> None:
        self.pixels = pixels
        self._free = pixels
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        if self.pixels <= 0:  # unbounded
            yield
            return
        want = min(pixels, self.pixels)  # an image over the budget decodes alone
        with self._cond:
            self._cond.wait_for(lambda: self._free >= want)
            self._free -= want
        try:
            yield
        finally:
            with self._cond:
                self._free += want
                self._cond.notify_all()


_budgets: dict[int, PixelBudget] = {}
_budgets_lock = threading.Lock()


def decode_budget(limits: ImageLimits) -> PixelBudget:
    """The process' budget for these limits (one per configured size, shared by threads)."""
    pixels = limits.max_pixels if limits.max_decoding_pixels is None else limits.max_decoding_pixels
    with _budgets_lock:
        return _budgets.setdefault(pixels, PixelBudget(pixels))


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header declares, checked against the limits (no pixel decoded)."""

    format: str
    width: int
    height: int
    sha256: str  # of the encoded bytes: the content-hash id


def _open_checked(data: bytes, limits: ImageLimits) -> Image.Image:
    """Opens an image (header only) and checks bytes, format and declared pixels."""
    if not data:
        raise InvalidInput("image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise InvalidInput(f"image is {len(data)} bytes, more than the limit of {limits.max_bytes} bytes")
    img = Image.open(io.BytesIO(data))
    fmt = (img.format or "").upper()
    if fmt not in limits.allowed_formats:
        raise InvalidInput(f"image format {fmt or 'unknown'} is not allowed (allowed: {', '.join(limits.allowed_formats)})")
    width, height = img.size
    if width <= 0 or height <= 0:
        raise InvalidInput(f"image has invalid dimensions {width}x{height}")
    if width * height > limits.max_pixels:
        raise InvalidInput(
            f"image is {width}x{height} = {width * height} pixels, more than the limit of "
            f"{limits.max_pixels} pixels ({PIXEL_LIMIT_SETTING})"
        )
    return img


@contextmanager
def _refusals() -> Iterator[None]:
    """Pillow's errors on bad files as InvalidInput with a reason callers can act on."""
    try:
        yield
    except InvalidInput:
        raise
    except UnidentifiedImageError:
        raise InvalidInput("data is not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InvalidInput(f"image is corrupt or truncated: {e}") from None


def inspect_image(data: bytes, limits: ImageLimits) -> ImageHeader:
    """Checks an image's header against the limits without decoding a pixel.

    For a service that keeps no pixels (search): the services that decode the image (the
    captioner, the embedder) refuse a corrupt body themselves, with the same message."""
    with _refusals():
        img = _open_checked(data, limits)
        return ImageHeader((img.format or "").upper(), img.width, img.height, sha256_hex(data))


def decode_image(data: bytes, limits: ImageLimits, need: PixelNeed | None = None) -> DecodedImage:
    """Decodes and validates an image; raises `InvalidInput` with a precise reason.

    With `need`, the returned image may be smaller than the file (see `PixelNeed`); every
    byte of the file is still decoded, so a corrupt or truncated image is refused alike.
    """
    with _refusals():
        img = _open_checked(data, limits)
        fmt = (img.format or "").upper()
        width, height = img.size
        img.seek(0)  # animations: the first frame
        factor = need.factor(width, height) if need is not None and limits.reduce_on_decode else 1
        with decode_budget(limits).hold(width * height):
            if factor > 1 and fmt in ("JPEG", "MPO"):
                # Ask for the size we will reduce to; libjpeg picks the nearest 1/2^k scale above it.
                img.draft("RGB", (max(1, width // factor), max(1, height // factor)))
            img.load()
            img = _shrink(img, factor, width)
            img = ImageOps.exif_transpose(img) or img
            rgb = img.convert("RGB")
    return DecodedImage(rgb, fmt, rgb.width, rgb.height, sha256_hex(data), (width, height))


def _shrink(img: Image.Image, factor: int, declared_width: int) -> Image.Image:
    """Reduces a loaded image to about 1/`factor` of its declared size, in its own mode."""
    # A JPEG draft may already have done part (or all) of the reduction.
    remaining = img.width * factor // declared_width
    if remaining <= 1:
        return img
    out = img.reduce(remaining) if img.mode in _REDUCIBLE else _reduce_in_bands(img, remaining)
    out.info = img.info  # keeps EXIF (orientation) for exif_transpose
    return out


def _reduce_in_bands(img: Image.Image, factor: int) -> Image.Image:
    """Palette / 1-bit / 16-bit images: `reduce` needs a wider mode, and converting the
    whole frame would cost what shrinking saves, so convert and reduce a band at a time
    (sampling instead would alias dithered palettes into noise)."""
    if img.mode == "P" and "transparency" in img.info:
        wide = "RGBA"
    else:
        wide = {"1": "L", "P": "RGB", "I;16": "I", "I;16B": "I", "I;16L": "I"}.get(img.mode, "RGB")
    out = Image.new(wide, (-(-img.width // factor), -(-img.height // factor)))
    rows = factor * max(1, 1_048_576 // (img.width * 4))  # about 1 MiB of wide pixels a band
    for top in range(0, img.height, rows):
        band = img.crop((0, top, img.width, min(img.height, top + rows))).convert(wide).reduce(factor)
        out.paste(band, (0, top // factor))
    return out
