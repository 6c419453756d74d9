"""Which files `mmsearch ingest PATH` picks up: folders, globs, CSVs in the seeds' shape."""
from __future__ import annotations

from pathlib import Path

import pytest

from mmsearch.cli.discovery import DiscoveryError, LocalItem, discover, read_csv
from tests.conftest import png_bytes


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    (root / "train" / "cat").mkdir(parents=True)
    (root / "train" / "dog").mkdir(parents=True)
    (root / ".thumbs").mkdir()
    for rel in ("train/cat/a.jpg", "train/cat/b.PNG", "train/dog/c.jpeg", "top.webp", ".thumbs/hidden.jpg"):
        (root / rel).write_bytes(png_bytes())
    (root / "notes.txt").write_text("not an image")
    (root / "train" / "dog" / "d.json").write_text("{}")
    return root


def _names(items: list[LocalItem]) -> list[str]:
    return [it.path.name for it in items]


def test_folder_is_recursive_sorted_images_only_without_hidden(photos: Path) -> None:
    assert _names(discover(photos)) == ["top.webp", "a.jpg", "b.PNG", "c.jpeg"]


def test_glob_patterns(photos: Path) -> None:
    assert _names(discover(f"{photos}/train/*/*.jpg")) == ["a.jpg"]
    assert _names(discover(f"{photos}/**/*.jp*g")) == ["a.jpg", "c.jpeg"]
    assert _names(discover(f"{photos}/*")) == ["top.webp"]  # notes.txt and folders skipped


def test_single_file(photos: Path) -> None:
    items = discover(photos / "top.webp")
    assert items == [LocalItem(photos / "top.webp")]


def test_csv_with_header_in_the_seeds_shape(photos: Path) -> None:
    csv_path = photos / "reverse_image_search.csv"
    csv_path.write_text(
        "id,path,label\n"
        "0,./train/cat/a.jpg,cat\n"
        "1,train/dog/c.jpeg,dog\n"
        f"2,{photos / 'top.webp'},\n"
        "\n"
    )
    items = read_csv(csv_path)
    assert [it.id for it in items] == ["0", "1", "2"]
    assert items[0].path == (photos / "train" / "cat" / "a.jpg").resolve()
    assert items[1].path == (photos / "train" / "dog" / "c.jpeg").resolve()
    assert items[2].path == photos / "top.webp"
    assert [it.metadata for it in items] == [{"label": "cat"}, {"label": "dog"}, {}]
    assert discover(csv_path) == items


def test_csv_without_header_and_with_extra_columns(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(png_bytes())
    plain = tmp_path / "plain.csv"
    plain.write_text("7,x.png,bird\n")
    assert read_csv(plain) == [LocalItem((tmp_path / "x.png").resolve(), "7", {"label": "bird"})]
    reordered = tmp_path / "reordered.csv"
    reordered.write_text("label,path,split\nfish,x.png,train\n")
    assert read_csv(reordered) == [LocalItem((tmp_path / "x.png").resolve(), "", {"label": "fish", "split": "train"})]


def test_csv_rows_for_missing_files_are_kept_for_the_server_summary(tmp_path: Path) -> None:
    csv_path = tmp_path / "c.csv"
    csv_path.write_text("id,path,label\n1,nope.jpg,cat\n")
    (item,) = read_csv(csv_path)
    assert item.path == (tmp_path / "nope.jpg").resolve()  # reported as a failed item, not dropped


@pytest.mark.parametrize(
    ("content", "message"),
    [("", "empty CSV"), ("id,path,label\n1,,cat\n", "empty path"), ("justonecolumn\n", "expected columns")],
)
def test_bad_csvs(tmp_path: Path, content: str, message: str) -> None:
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text(content)
    with pytest.raises(DiscoveryError, match=message):
        discover(csv_path)


def test_nothing_found(tmp_path: Path) -> None:
    with pytest.raises(DiscoveryError, match="no such file"):
        discover(tmp_path / "missing")
    with pytest.raises(DiscoveryError, match="no images found"):
        discover(tmp_path)
    with pytest.raises(DiscoveryError, match="no images found"):
        discover(f"{tmp_path}/*.jpg")
