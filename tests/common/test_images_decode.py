"""Image decoding near the limits: IMAGES__MAX_PIXELS is the only pixel limit (in both
directions), decodes shrink to what the consumer needs, and a process-wide pixel budget
bounds concurrent large decodes."""
from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from services.common.errors import InvalidInput
from services.common.images import PixelBudget, PixelNeed, decode_image
from services.common.settings import ImageLimits
from tests.common.test_intake import png_declaring

PILLOW_LIMIT = 89_478_485  # Image.MAX_IMAGE_PIXELS before we switch it off


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def jpeg(image: Image.Image, **kw: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", **kw)  # type: ignore[arg-type]
    return buf.getvalue()


@pytest.fixture(scope="module")
def png_90mpx() -> bytes:
    """9,500 x 9,500 = 90.25 Mpx, just over Pillow's own limit; grey, so it stays small."""
    return png(Image.new("L", (9_500, 9_500), 90))


def test_a_raised_limit_admits_images_over_pillows_own(png_90mpx: bytes) -> None:
    assert 9_500 * 9_500 > PILLOW_LIMIT
    decoded = decode_image(png_90mpx, ImageLimits(max_pixels=120_000_000), PixelNeed(short_side=256))
    assert decoded.source_size == (9_500, 9_500)
    assert decoded.image.mode == "RGB" and 512 <= decoded.width < 1_024


def test_a_lowered_limit_refuses_and_names_itself(png_90mpx: bytes) -> None:
    with pytest.raises(InvalidInput) as e:
        decode_image(png_90mpx, ImageLimits(max_pixels=90_000_000))
    assert e.value.message == (
        "image is 9500x9500 = 90250000 pixels, more than the limit of 90000000 pixels (IMAGES__MAX_PIXELS)"
    )
    small = png(Image.new("RGB", (2_000, 1_000)))
    with pytest.raises(InvalidInput, match=r"more than the limit of 1000000 pixels \(IMAGES__MAX_PIXELS\)"):
        decode_image(small, ImageLimits(max_pixels=1_000_000))


@pytest.mark.parametrize("side", [10_000, 14_000, 60_000])  # over 1x and 2x Pillow's limit
def test_bombs_over_pillows_limit_get_our_message(side: int) -> None:
    with pytest.raises(InvalidInput) as e:
        decode_image(png_declaring(side, side), ImageLimits())
    assert "more than the limit of 40000000 pixels (IMAGES__MAX_PIXELS)" in e.value.message
    assert "decompression bomb" not in e.value.message.lower() and "DOS" not in e.value.message


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth noise (a blurred random field) so downscaling has something to average."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 200 + 1, width // 200 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "PNG-P"])
def test_decodes_shrink_to_twice_what_the_consumer_needs(fmt: str) -> None:
    img = noise(6_000, 4_000)
    if fmt == "PNG-P":
        data = png(img.convert("P"))
    else:
        data = jpeg(img, quality=85) if fmt == "JPEG" else png(img)
    decoded = decode_image(data, ImageLimits(), PixelNeed(short_side=256))
    assert decoded.source_size == (6_000, 4_000)
    assert 512 <= decoded.height < 1_024 and decoded.width / decoded.height == pytest.approx(1.5, rel=0.01)
    full = decode_image(data, ImageLimits(), None)
    assert full.image.size == (6_000, 4_000)
    # The same picture: the shrunk decode, resized to 256, matches the full one resized.
    a = np.asarray(decoded.image.resize((384, 256), Image.Resampling.BICUBIC), dtype=np.float32)
    b = np.asarray(full.image.resize((384, 256), Image.Resampling.BICUBIC), dtype=np.float32)
    assert np.abs(a - b).mean() < 3.0


def test_shrinking_keeps_exif_orientation_and_can_be_switched_off() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    data = jpeg(noise(4_000, 1_000), exif=exif)
    decoded = decode_image(data, ImageLimits(), PixelNeed(short_side=100))
    assert decoded.height > decoded.width  # rotated after shrinking
    assert decoded.height < 4_000
    off = decode_image(data, ImageLimits(reduce_on_decode=False), PixelNeed(short_side=100))
    assert off.image.size == (1_000, 4_000)


def test_validation_only_decode_still_refuses_a_truncated_file() -> None:
    data = jpeg(noise(3_000, 3_000), quality=90)
    with pytest.raises(InvalidInput, match="corrupt or truncated"):
        decode_image(data[: len(data) * 2 // 3], ImageLimits(), PixelNeed())
    assert decode_image(data, ImageLimits(), PixelNeed()).width <= 4


def test_pixel_budget_bounds_concurrent_large_decodes() -> None:
    budget = PixelBudget(40_000_000)
    inside, peak, lock = 0, 0, threading.Lock()

    def work(pixels: int) -> None:
        nonlocal inside, peak
        with budget.hold(pixels):
            with lock:
                inside += min(pixels, budget.pixels)
                peak = max(peak, inside)
            time.sleep(0.02)
            with lock:
                inside -= min(pixels, budget.pixels)

    threads = [threading.Thread(target=work, args=(p,)) for p in [36_000_000] * 6 + [1_000_000] * 4 + [90_000_000]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)  # an image over the budget decodes alone, no deadlock
    assert 36_000_000 <= peak <= 40_000_000 and budget._free == budget.pixels
    # Two near-limit images never decode at once within a 40 Mpx budget.
    pairs = PixelBudget(40_000_000)
    with pairs.hold(36_000_000):
        blocked = threading.Thread(target=lambda: pairs.hold(36_000_000).__enter__())
        blocked.start()
        blocked.join(0.2)
        assert blocked.is_alive()
    blocked.join(2)
    assert not blocked.is_alive()
