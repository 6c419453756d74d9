"""`mmsearch demo`: the photos it writes, and its whole flow against an already running
suite (`--address`; the real one of tests/conftest.py). The demo script with its own
suite runs in test_cli_e2e_demo.py."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageChops, ImageOps
from typer.testing import CliRunner

from mmsearch.cli.demo import FLIPPED, QUERIES, write_photos
from mmsearch.cli.discovery import discover
from mmsearch.cli.main import app
from tests.conftest import RealSuite


def test_write_photos_gallery_csv_and_flipped_query(tmp_path: Path) -> None:
    csv_path, queries = write_photos(tmp_path)
    items = discover(csv_path)
    assert len(items) == 17 and {"cat", "coffee", "rocket", "astronaut"} <= {it.id for it in items}
    assert all(it.path.is_file() and it.metadata["label"] == it.id for it in items)
    cat = next(it for it in items if it.id == "cat")
    with Image.open(cat.path) as original, Image.open(queries / FLIPPED) as flipped:
        assert flipped.size == original.size
        diff = ImageChops.difference(ImageOps.mirror(original.convert("RGB")), flipped.convert("RGB"))
        assert max(hi for _, hi in diff.getextrema()) < 60  # a mirror image (JPEG noise aside)
    assert not (tmp_path / "photos" / FLIPPED).exists()  # a query, never ingested
    before = cat.path.read_bytes()
    write_photos(tmp_path)
    assert cat.path.read_bytes() == before  # stable bytes: a re-run is "unchanged"


def test_demo_flow_against_a_running_server(real_suite: RealSuite, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["--address", real_suite.address, "--token", real_suite.token, "--timeout", "120",
                                      "demo", "--out", str(out), "--top-k", "4"])
    assert result.exit_code == 0, result.output
    assert "contact sheets:" in result.output
    # 17 photos, each stored now or already (another test of the session may have sent the same ones)
    summary = result.output[result.output.index("of 17 items") - 60 : result.output.index("of 17 items")]
    assert "0 failed" in summary
    sheets = sorted((out / "sheets").glob("*.png"))
    assert len(sheets) == len(QUERIES)
    assert sheets[0].name.startswith("01_text-image_a-cat")
    index = (out / "index.html").read_text()
    assert index.count("<img") == len(QUERIES)
