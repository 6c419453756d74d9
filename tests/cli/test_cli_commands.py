"""The CLI commands through typer's CliRunner, against the real suite (real search,
embedder and captioner processes, Milvus Lite; `real_suite` in tests/conftest.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from mmsearch.cli.main import app
from services.lite_models.sample_photos import load_sample_photos
from tests.conftest import RealSuite, png_bytes

runner = CliRunner()
# Searches are limited to this module's own items: the suite is shared with other tests.
MINE = 'id like "cli-%"'


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """Three real photos and a CSV naming them, with ids of this test module."""
    root = tmp_path / "photos"
    (root / "train").mkdir(parents=True)
    for photo in load_sample_photos(["cat", "coffee", "rocket"]):
        photo.image.convert("RGB").save(root / "train" / f"{photo.name}.jpg", format="JPEG", quality=92)
    (root / "reverse_image_search.csv").write_text(
        "id,path,label\ncli-cat,./train/cat.jpg,cat\ncli-coffee,./train/coffee.jpg,coffee\n"
        "cli-rocket,./train/rocket.jpg,rocket\n"
    )
    return root


def cli(suite: RealSuite, *args: str, env: dict[str, str | None] | None = None):
    env = {"MMSEARCH_TOKEN": suite.token, **(env or {})}
    return runner.invoke(app, ["--address", suite.address, "--timeout", "120", *args], env=env)


def test_ingest_csv_then_search_get_delete_stats(real_suite: RealSuite, photos: Path, tmp_path: Path) -> None:
    count = json.loads(cli(real_suite, "stats", "--json").output)["item_count"]
    result = cli(real_suite, "ingest", str(photos / "reverse_image_search.csv"), "--chunk-size", "2")
    assert result.exit_code == 0, result.output
    assert "3 stored" in result.output and "0 failed" in result.output
    record = json.loads(cli(real_suite, "get", "cli-cat", "--json").output)["records"][0]
    assert record["metadata"] == {"label": "cat"}
    assert record["uri"] == (photos / "train" / "cat.jpg").resolve().as_uri()

    again = cli(real_suite, "ingest", str(photos / "reverse_image_search.csv"))
    assert again.exit_code == 0 and "3 unchanged" in again.output

    out = tmp_path / "sheet.png"
    result = cli(real_suite, "search", "--text", "a photo of a cat", "--top-k", "2", "--filter", MINE, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "text → image" in result.output and "cli-cat" in result.output
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size[0] > 400
    assert "3 tiles" in result.output

    result = cli(real_suite, "search", "--text", "a cat", "--mode", "caption", "--top-k", "3", "--offset", "1",
                 "--filter", MINE, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["target"] == "caption" and [h["rank"] for h in data["hits"]] == [2, 3]
    assert data["query"]["label"] == "text → text"

    result = cli(real_suite, "search", "--image", str(photos / "train" / "cat.jpg"), "--mode", "hybrid",
                 "--fusion", "weighted", "--filter", f'{MINE} and metadata["label"] == "coffee"', "--json")
    assert result.exit_code == 0, result.output
    assert [h["id"] for h in json.loads(result.output)["hits"]] == ["cli-coffee"]

    composed_sheet = tmp_path / "composed.png"
    result = cli(real_suite, "search", "--image", str(photos / "train" / "cat.jpg"), "--instruction", "a rocket",
                 "--top-k", "1", "--filter", MINE, "--out", str(composed_sheet))
    assert result.exit_code == 0, result.output
    assert "image + text → image" in result.output and composed_sheet.exists()

    result = cli(real_suite, "get", "cli-cat", "nope")
    assert result.exit_code == 1 and "not found: nope" in result.output

    result = cli(real_suite, "delete", "cli-cat", "nope")
    assert result.exit_code == 0 and "deleted 1 of 2" in result.output
    result = cli(real_suite, "stats", "--json")
    assert json.loads(result.output)["item_count"] == count + 2
    result = cli(real_suite, "stats")
    assert "item count" in result.output and "embedded" in result.output


def test_ingest_folder_with_failures_exits_1_with_reasons(real_suite: RealSuite, tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "good.png").write_bytes(png_bytes(color=(17, 171, 71)))
    (folder / "broken.png").write_bytes(b"this is not a png")
    result = cli(real_suite, "ingest", str(folder))
    assert result.exit_code == 1, result.output
    assert "1 failed" in result.output and ("1 stored" in result.output or "1 unchanged" in result.output)
    assert "broken.png" in result.output and "INVALID_ARGUMENT" in result.output and "not a recognised image" in result.output


def test_ingest_json_and_local_failures(real_suite: RealSuite, tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(png_bytes(color=(3, 141, 59)))
    csv_path = tmp_path / "items.csv"
    csv_path.write_text("id,path,label\ncli-json-1,a.png,x\ncli-json-2,missing.png,y\n")
    result = cli(real_suite, "ingest", str(csv_path), "--json")
    assert result.exit_code == 1
    data = json.loads(result.output)
    assert (data["stored"], data["failed"]) == (1, 1)
    failed = data["outcomes"][1]
    assert failed["local"] and "file not found" in failed["error_message"] and failed["path"].endswith("missing.png")
    assert failed["error_code"] == "INVALID_ARGUMENT"


def test_ingest_nothing_found(real_suite: RealSuite, tmp_path: Path) -> None:
    result = cli(real_suite, "ingest", str(tmp_path / "nothing"))
    assert result.exit_code == 1 and "no such file" in result.output


def test_search_argument_errors(real_suite: RealSuite, tmp_path: Path) -> None:
    assert cli(real_suite, "search").exit_code == 2
    assert cli(real_suite, "search", "--text", "a", "--image", "b.png").exit_code == 2
    assert cli(real_suite, "search", "--text", "a", "--instruction", "b").exit_code == 2
    result = cli(real_suite, "search", "--image", str(tmp_path / "missing.png"))
    assert result.exit_code == 2 and "no such file" in result.output
    assert cli(real_suite, "search", "--text", "a", "--mode", "pixels").exit_code == 2


def test_token_from_environment(real_suite: RealSuite) -> None:
    result = cli(real_suite, "stats", env={"MMSEARCH_TOKEN": None})
    assert result.exit_code == 1 and "UNAUTHENTICATED" in result.output and "MMSEARCH_TOKEN" in result.output
    result = cli(real_suite, "stats", env={"MMSEARCH_TOKEN": real_suite.token})
    assert result.exit_code == 0, result.output


def test_unreachable_service_says_how_to_start_it() -> None:
    result = runner.invoke(app, ["--address", "127.0.0.1:1", "--timeout", "2", "stats"])
    assert result.exit_code == 1 and "UNAVAILABLE" in result.output and "mmsearch up" in result.output


def test_health_of_all_services(real_suite: RealSuite) -> None:
    result = cli(real_suite, "health", "--embedder-address", real_suite.embedder_address,
                 "--captioner-address", real_suite.captioner_address, "--json")
    assert result.exit_code == 0, result.output
    assert [row["status"] for row in json.loads(result.output)] == ["SERVING"] * 3
    result = cli(real_suite, "health", "--embedder-address", real_suite.embedder_address,
                 "--captioner-address", "127.0.0.1:1")
    assert result.exit_code == 1 and "captioner" in result.output and "UNAVAILABLE" in result.output


def test_help_lists_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("up", "ingest", "search", "get", "delete", "stats", "health", "demo"):
        assert command in result.output
