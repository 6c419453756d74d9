"""Image intake: decode untrusted bytes safely, or fail with a message naming the problem.

Pillow's own bomb check only warns below 2x its limit, so we check the declared size
from the header *before* decoding any pixel data.
"""
from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from services.common.errors import InvalidInput
from services.common.settings import ImageLimits

# Never let Pillow half-decode a truncated file into a grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # RGB, EXIF orientation applied
    format: str
    width: int
    height: int
    sha256: str  # of the encoded bytes: the content-hash id


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode_image(data: bytes, limits: ImageLimits) -> DecodedImage:
    """Decodes and validates an image; raises `InvalidInput` with a precise reason."""
    if not data:
        raise InvalidInput("image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise InvalidInput(f"image is {len(data)} bytes, more than the limit of {limits.max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = (img.format or "").upper()
            if fmt not in limits.allowed_formats:
                raise InvalidInput(f"image format {fmt or 'unknown'} is not allowed (allowed: {', '.join(limits.allowed_formats)})")
            width, height = img.size
            if width <= 0 or height <= 0:
                raise InvalidInput(f"image has invalid dimensions {width}x{height}")
            if width * height > limits.max_pixels:
                raise InvalidInput(
                    f"image is {width}x{height} = {width * height} pixels, more than the limit of {limits.max_pixels} pixels"
                )
            img.seek(0)  # animations: the first frame
            img.load()
            img = ImageOps.exif_transpose(img) or img
            rgb = img.convert("RGB")
    except InvalidInput:
        raise
    except UnidentifiedImageError:
        raise InvalidInput("data is not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InvalidInput(f"image exceeds the pixel limit (decompression bomb): {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InvalidInput(f"image is corrupt or truncated: {e}") from None
    return DecodedImage(rgb, fmt, rgb.width, rgb.height, sha256_hex(data))
