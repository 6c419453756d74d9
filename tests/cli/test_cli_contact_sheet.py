"""Contact sheet rendering: a real PNG, the right geometry, one tile per hit plus the query."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFont

from mmsearch.cli.contact_sheet import (
    SheetHit,
    SheetQuery,
    load_image,
    local_path_of,
    render_contact_sheet,
    wrap_text,
    write_contact_sheet,
)

COLORS = [(220, 30, 30), (30, 160, 60), (30, 60, 220), (230, 200, 20), (150, 40, 180)]


def _hits(n: int, missing: int | None = None) -> list[SheetHit]:
    hits = []
    for i in range(n):
        color = COLORS[i % len(COLORS)]
        image = None if i == missing else Image.new("RGB", (300 + 40 * i, 200), color)
        hits.append(SheetHit(rank=i + 1, score=0.9 - 0.05 * i, name=f"item-{i}.jpg", caption="a long caption " * 8, image=image))
    return hits


def _center_of_thumb(layout, index: int, thumb: int = 220) -> tuple[int, int]:
    left, top, _, _ = layout.tiles[index]
    return left + 12 + thumb // 2, top + 12 + thumb // 2


def test_written_png_has_the_layout_size_and_one_tile_per_hit(tmp_path: Path) -> None:
    out = tmp_path / "sheets" / "cat.png"
    query = SheetQuery("text → image", text="a cat")
    layout = write_contact_sheet(out, query, _hits(8), subtitle="8 hits")
    with Image.open(out) as png:
        assert png.format == "PNG"
        assert png.size == layout.size
        sheet = png.convert("RGB")
    assert len(layout.tiles) == 9 and (layout.columns, layout.rows) == (3, 3)
    tile_w, tile_h = layout.tile_size
    # tiles do not overlap and all lie inside the sheet
    for left, top, right, bottom in layout.tiles:
        assert right - left + 1 == tile_w and bottom - top + 1 == tile_h
        assert 0 <= left and right < layout.size[0] and bottom < layout.size[1]
    assert len({(t[0], t[1]) for t in layout.tiles}) == 9
    # every hit tile shows its own thumbnail (the colour of its image) at its centre
    for i in range(8):
        assert sheet.getpixel(_center_of_thumb(layout, i + 1)) == pytest.approx(COLORS[i % len(COLORS)], abs=3)


def test_tile_count_and_columns_follow_the_hits() -> None:
    query = SheetQuery("image → image", image=Image.new("RGB", (64, 64), (0, 0, 0)))
    for n, cols, rows in ((0, 1, 1), (1, 2, 1), (3, 2, 2), (10, 4, 3), (40, 6, 7)):
        _, layout = render_contact_sheet(query, _hits(n))
        assert len(layout.tiles) == n + 1
        assert (layout.columns, layout.rows) == (cols, rows)
    sheet, layout = render_contact_sheet(query, _hits(5), columns=6, thumb=100)
    assert (layout.columns, layout.rows) == (6, 1) and sheet.size == layout.size
    # the query image is the first tile's thumbnail
    assert sheet.getpixel(_center_of_thumb(layout, 0, thumb=100)) == (0, 0, 0)


def test_missing_images_get_a_placeholder_and_text_queries_a_text_tile() -> None:
    sheet, layout = render_contact_sheet(SheetQuery("text → text", text="a cup of coffee"), _hits(3, missing=1))
    placeholder = sheet.getpixel(_center_of_thumb(layout, 2))
    assert placeholder != COLORS[1]
    text_tile = sheet.crop((layout.tiles[0][0] + 12, layout.tiles[0][1] + 12, layout.tiles[0][0] + 232, layout.tiles[0][1] + 232))
    assert len(text_tile.getcolors(maxcolors=100_000) or []) > 2  # the query text is drawn


def test_grayscale_rgba_and_odd_images_render() -> None:
    hits = [
        SheetHit(1, 0.5, "gray", "", Image.new("L", (50, 400), 128)),
        SheetHit(2, 0.5, "rgba", "", Image.new("RGBA", (400, 50), (10, 20, 30, 128))),
        SheetHit(3, 0.5, "palette", "", Image.new("P", (20, 20))),
        SheetHit(4, 0.5, "x" * 300, "y" * 500, Image.new("1", (20, 20))),
    ]
    sheet, layout = render_contact_sheet(SheetQuery("composed", image=Image.new("RGB", (10, 10)), instruction="in black"), hits)
    assert sheet.mode == "RGB" and len(layout.tiles) == 5


def test_wrap_text_respects_width_and_line_limit() -> None:
    draw = ImageDraw.Draw(Image.new("RGB", (10, 10)))
    font = ImageFont.load_default(size=14)
    lines = wrap_text(draw, "the quick brown fox jumps over the lazy dog " * 5, font, 120, 3)
    assert len(lines) == 3 and lines[-1].endswith("…")
    assert all(draw.textlength(line, font=font) <= 120 for line in lines)
    assert wrap_text(draw, "short", font, 120, 3) == ["short"]
    assert wrap_text(draw, "", font, 120, 3) == []
    long_word = wrap_text(draw, "a" * 200, font, 60, 2)
    assert all(draw.textlength(line, font=font) <= 60 for line in long_word)


def test_hit_images_load_from_file_uris_and_paths_never_from_the_network(tmp_path: Path) -> None:
    path = tmp_path / "a b.png"
    Image.new("RGB", (30, 20), (1, 2, 3)).save(path)
    assert local_path_of(path.as_uri()) == path
    assert load_image(path.as_uri()).size == (30, 20)
    assert load_image(str(path)).size == (30, 20)
    assert load_image("https://example.com/x.png") is None
    assert load_image("file://otherhost/x.png") is None
    assert load_image(str(tmp_path / "missing.png")) is None
    (tmp_path / "bad.png").write_bytes(b"not a png")
    assert load_image(str(tmp_path / "bad.png")) is None
    assert load_image("") is None
