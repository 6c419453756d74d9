"""What `mmsearch ingest PATH` sends: the images in a folder, a glob, or a CSV.

The CSV is the seeds' `reverse_image_search.csv` shape: columns `id, path, label`
(a header row is optional; with a header, columns may come in any order and extra
columns become metadata too). `label` and the extra columns go into the item's
metadata (`{"label": "cat"}`), filterable as `metadata["label"] == "cat"`. Relative
paths are resolved against the CSV's folder.
"""
from __future__ import annotations

import csv
import glob
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
CSV_COLUMNS = ("id", "path", "label")


class DiscoveryError(ValueError):
    """PATH names nothing usable; the message says what was looked for."""


@dataclass(frozen=True)
class LocalItem:
    path: Path
    id: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def discover(spec: str | Path) -> list[LocalItem]:
    """Items for a folder (recursive, sorted), a glob (`photos/**/*.jpg`), a CSV or one image."""
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix.lower() == ".csv":
        items = read_csv(path)
    elif path.is_dir():
        items = [LocalItem(p) for p in sorted(path.rglob("*")) if is_image_file(p) and not _hidden(p, path)]
    elif path.is_file():
        items = [LocalItem(path)]
    elif glob.has_magic(text):
        matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True))
        items = [LocalItem(p) for p in matches if is_image_file(p)]
    else:
        raise DiscoveryError(f"{text}: no such file or folder, and not a glob pattern")
    if not items:
        raise DiscoveryError(f"{text}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return items


def _hidden(p: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in p.relative_to(root).parts)


def read_csv(path: Path) -> list[LocalItem]:
    """Rows of `id, path, label` (header optional) -> items; paths relative to the CSV."""
    base = path.parent
    with path.open(newline="", encoding="utf-8-sig") as f:
        rows = [row for row in csv.reader(f) if row and any(cell.strip() for cell in row)]
    if not rows:
        raise DiscoveryError(f"{path}: empty CSV")
    first = [cell.strip().lower() for cell in rows[0]]
    if "path" in first:
        header, rows = first, rows[1:]
    else:
        if len(first) < 2:
            raise DiscoveryError(f"{path}: expected columns id, path, label (no header row found)")
        header = [*CSV_COLUMNS, *(f"column_{i}" for i in range(len(CSV_COLUMNS), len(first)))]
    items = []
    for line_no, row in enumerate(rows, start=2 if header is first else 1):
        record = {name: cell.strip() for name, cell in zip(header, row)}
        raw_path = record.pop("path", "")
        if not raw_path:
            raise DiscoveryError(f"{path}:{line_no}: empty path")
        item_path = Path(raw_path).expanduser()
        if not item_path.is_absolute():
            item_path = (base / item_path).resolve()
        item_id = record.pop("id", "")
        metadata = {k: v for k, v in record.items() if v != ""}
        items.append(LocalItem(item_path, item_id, metadata))
    return items
