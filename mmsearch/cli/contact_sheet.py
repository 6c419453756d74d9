"""A contact sheet of search results: the query first, then one tile per hit.

Like the grids the seed tutorials paste together, but readable on its own: every
tile is a letterboxed thumbnail (aspect kept) over a caption band with the rank, the
score (number and bar), the item's name and its wrapped caption. The query tile has
an accent frame and shows the query image, or the query text when there is none.
Drawn with Pillow's ImageDraw and its bundled default font, so no font files needed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image, ImageDraw, ImageFont, ImageOps

BACKGROUND = (246, 246, 243)
TILE_BG = (255, 255, 255)
THUMB_BG = (230, 230, 226)
BORDER = (210, 210, 205)
ACCENT = (37, 99, 235)
INK = (28, 28, 30)
MUTED = (105, 105, 110)
BAR_BG = (228, 232, 240)


@dataclass
class SheetQuery:
    """The query tile. `mode` is a label such as "text → image"."""

    mode: str
    text: str | None = None
    image: Image.Image | None = None
    instruction: str | None = None


@dataclass
class SheetHit:
    rank: int
    score: float
    name: str
    caption: str = ""
    image: Image.Image | None = None


@dataclass
class SheetLayout:
    """Where everything went: tests and callers can check the geometry."""

    size: tuple[int, int]
    columns: int
    rows: int
    tile_size: tuple[int, int]
    # (left, top, right, bottom) of each tile; the first is the query.
    tiles: list[tuple[int, int, int, int]] = field(default_factory=list)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def wrap_text(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap by pixel width; the last kept line ends with "…" when text is cut."""
    words = text.split()
    lines: list[str] = []
    current = ""
    for word in words:
        if len(lines) > max_lines:
            break  # enough to know the text is cut
        candidate = f"{current} {word}".strip()
        if draw.textlength(candidate, font=font) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = word
        while len(current) > 1 and len(lines) <= max_lines and draw.textlength(current, font=font) > width:
            cut = _longest_fitting_prefix(draw, current, font, width)  # an over-long word
            lines.append(current[:cut])
            current = current[cut:]
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and draw.textlength(last + "…", font=font) > width:
            last = last[:-1]
        lines[-1] = last.rstrip() + "…"
    return lines


def _longest_fitting_prefix(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> int:
    lo, hi = 1, len(text)  # binary search: at least one character per line
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if draw.textlength(text[:mid], font=font) <= width:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _glyph_safe(text: str) -> str:
    """The bundled font has no arrows: "text → image" is drawn as "text -> image"."""
    return text.replace("→", "->")


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> str:
    return wrap_text(draw, text, font, width, 1)[0] if text else ""


def _thumbnail(image: Image.Image, size: int) -> Image.Image:
    """Letterboxed into a square, aspect kept, on a neutral background."""
    img = ImageOps.exif_transpose(image)
    if img.mode not in ("RGB", "RGBA"):
        img = img.convert("RGBA" if "A" in img.getbands() or img.mode == "P" else "RGB")
    img = ImageOps.contain(img, (size, size), Image.Resampling.LANCZOS)  # small images scale up too
    canvas = Image.new("RGB", (size, size), THUMB_BG)
    offset = ((size - img.width) // 2, (size - img.height) // 2)
    canvas.paste(img, offset, img if img.mode == "RGBA" else None)
    return canvas


def render_contact_sheet(
    query: SheetQuery,
    hits: list[SheetHit],
    *,
    thumb: int = 220,
    columns: int | None = None,
    title: str | None = None,
    subtitle: str | None = None,
) -> tuple[Image.Image, SheetLayout]:
    n_tiles = 1 + len(hits)
    cols = columns or max(1, min(6, math.ceil(math.sqrt(n_tiles))))
    rows = math.ceil(n_tiles / cols)
    pad, gap = 12, 14
    f_title, f_sub, f_rank, f_small, f_caption, f_query = _font(24), _font(15), _font(18), _font(13), _font(14), _font(20)
    caption_lines = 3
    band = 10 + 22 + 8 + 18 + caption_lines * 18 + 6  # rank/score, bar, name, caption lines
    tile_w, tile_h = thumb + 2 * pad, thumb + 2 * pad + band
    margin = 24
    width = margin * 2 + cols * tile_w + (cols - 1) * gap
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    sub_lines = wrap_text(measure, _glyph_safe(subtitle), f_sub, width - 2 * margin, 2) if subtitle else []
    header = 24 + 30 + 20 * len(sub_lines) + (4 if sub_lines else 0) + 12
    height = header + margin + rows * tile_h + (rows - 1) * gap
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)

    heading = _glyph_safe(title or f"mmsearch · {query.mode}")
    mode = _glyph_safe(query.mode)
    draw.text((margin, 22), _fit(draw, heading, f_title, width - 2 * margin), font=f_title, fill=INK)
    for k, line in enumerate(sub_lines):
        draw.text((margin, 56 + 20 * k), line, font=f_sub, fill=MUTED)

    layout = SheetLayout(size=(width, height), columns=cols, rows=rows, tile_size=(tile_w, tile_h))
    top_score = max((h.score for h in hits), default=0.0)
    low_score = min((h.score for h in hits), default=0.0)
    text_w = thumb

    for i in range(n_tiles):
        r, c = divmod(i, cols)
        x0 = margin + c * (tile_w + gap)
        y0 = header + r * (tile_h + gap)
        box = (x0, y0, x0 + tile_w - 1, y0 + tile_h - 1)
        layout.tiles.append(box)
        is_query = i == 0
        draw.rounded_rectangle(box, radius=8, fill=TILE_BG, outline=ACCENT if is_query else BORDER, width=3 if is_query else 1)
        tx, ty = x0 + pad, y0 + pad
        by = ty + thumb + 10  # caption band top

        if is_query:
            if query.image is not None:
                sheet.paste(_thumbnail(query.image, thumb), (tx, ty))
            else:
                draw.rectangle((tx, ty, tx + thumb - 1, ty + thumb - 1), fill=(232, 239, 253))
                lines = wrap_text(draw, f"“{query.text or ''}”", f_query, thumb - 24, 6)
                line_h = 26
                start = ty + (thumb - line_h * len(lines)) // 2
                for k, line in enumerate(lines):
                    lw = draw.textlength(line, font=f_query)
                    draw.text((tx + (thumb - lw) / 2, start + k * line_h), line, font=f_query, fill=INK)
            draw.text((tx, by), "QUERY", font=f_rank, fill=ACCENT)
            mode_w = draw.textlength(mode, font=f_small)
            draw.text((tx + text_w - mode_w, by + 4), mode, font=f_small, fill=MUTED)
            detail = ""
            if query.image is not None and query.text:
                detail = query.text  # the query image's name
            if query.instruction:
                detail = f"{detail} + “{query.instruction}”".strip()
            for k, line in enumerate(wrap_text(draw, detail, f_caption, text_w, caption_lines + 1)):
                draw.text((tx, by + 34 + k * 18), line, font=f_caption, fill=INK)
            continue

        hit = hits[i - 1]
        if hit.image is not None:
            sheet.paste(_thumbnail(hit.image, thumb), (tx, ty))
        else:
            draw.rectangle((tx, ty, tx + thumb - 1, ty + thumb - 1), fill=THUMB_BG)
            msg = "image not available"
            mw = draw.textlength(msg, font=f_small)
            draw.text((tx + (thumb - mw) / 2, ty + thumb / 2 - 8), msg, font=f_small, fill=MUTED)
        draw.text((tx, by), f"#{hit.rank}", font=f_rank, fill=INK)
        score = f"{hit.score:.4f}"
        sw = draw.textlength(score, font=f_rank)
        draw.text((tx + text_w - sw, by), score, font=f_rank, fill=ACCENT)
        # score bar, relative to the spread of this page's scores
        bar_y = by + 26
        spread = top_score - low_score
        frac = 1.0 if spread <= 1e-9 else 0.15 + 0.85 * (hit.score - low_score) / spread
        draw.rounded_rectangle((tx, bar_y, tx + text_w, bar_y + 5), radius=2, fill=BAR_BG)
        draw.rounded_rectangle((tx, bar_y, tx + max(6, int(text_w * frac)), bar_y + 5), radius=2, fill=ACCENT)
        draw.text((tx, bar_y + 11), _fit(draw, hit.name, f_small, text_w), font=f_small, fill=MUTED)
        for k, line in enumerate(wrap_text(draw, hit.caption, f_caption, text_w, caption_lines)):
            draw.text((tx, bar_y + 30 + k * 18), line, font=f_caption, fill=INK)
    return sheet, layout


def write_contact_sheet(path: str | Path, query: SheetQuery, hits: list[SheetHit], **kwargs: object) -> SheetLayout:
    sheet, layout = render_contact_sheet(query, hits, **kwargs)  # type: ignore[arg-type]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG", optimize=True)
    return layout


def local_path_of(uri: str) -> Path | None:
    """The local file a hit's `uri` names (a `file://` URI or a plain path), if any."""
    if not uri:
        return None
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            return None
        return Path(unquote(parsed.path))
    if "://" in uri:
        return None  # remote: never fetched while drawing
    return Path(uri).expanduser()


def load_image(uri: str) -> Image.Image | None:
    """Opens a hit's image for its thumbnail; None when it is not a readable local file."""
    path = local_path_of(uri)
    if path is None or not path.is_file():
        return None
    try:
        with Image.open(path) as img:
            img.draft("RGB", (512, 512))  # JPEG: decode at reduced size, much faster
            img.load()
            return img.copy()
    except Exception:  # noqa: BLE001 - a corrupt / unsupported file only loses its thumbnail
        return None
