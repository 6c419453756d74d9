"""The CLI commands through typer's CliRunner, against the in-memory Search server on loopback."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from mmsearch.cli.main import app
from tests.client.search_double import RunningDouble, start_double
from tests.conftest import png_bytes

runner = CliRunner()


@pytest.fixture
def double() -> Iterator[RunningDouble]:
    running = start_double()
    yield running
    running.stop()


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    (root / "train").mkdir(parents=True)
    for name, color in (("cat", (200, 120, 40)), ("coffee", (90, 50, 20)), ("rocket", (20, 20, 90))):
        Image.new("RGB", (120, 90), color).save(root / "train" / f"{name}.jpg")
    (root / "reverse_image_search.csv").write_text(
        "id,path,label\ncat,./train/cat.jpg,cat\ncoffee,./train/coffee.jpg,coffee\nrocket,./train/rocket.jpg,rocket\n"
    )
    return root


def cli(double: RunningDouble, *args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, ["--address", double.address, *args], env=env)


def test_ingest_csv_then_search_get_delete_stats(double: RunningDouble, photos: Path, tmp_path: Path) -> None:
    result = cli(double, "ingest", str(photos / "reverse_image_search.csv"), "--chunk-size", "2")
    assert result.exit_code == 0, result.output
    assert "3 stored" in result.output and "0 failed" in result.output
    assert json.loads(double.servicer.items["cat"].metadata_json) == {"label": "cat"}
    assert double.servicer.items["cat"].uri == (photos / "train" / "cat.jpg").resolve().as_uri()

    again = cli(double, "ingest", str(photos / "reverse_image_search.csv"))
    assert again.exit_code == 0 and "3 unchanged" in again.output

    out = tmp_path / "sheet.png"
    result = cli(double, "search", "--text", "a photo of cat", "--top-k", "2", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "text → image" in result.output and "cat" in result.output and "0.9000" in result.output
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size[0] > 400
    assert "3 tiles" in result.output

    result = cli(double, "search", "--text", "cat", "--mode", "caption", "--top-k", "3", "--offset", "1", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["target"] == "caption" and [h["rank"] for h in data["hits"]] == [2, 3]
    assert data["query"]["label"] == "text → text"

    result = cli(double, "search", "--image", str(photos / "train" / "cat.jpg"), "--mode", "hybrid",
                 "--fusion", "weighted", "--filter", 'metadata["label"] == "coffee"', "--json")
    assert result.exit_code == 0, result.output
    assert [h["id"] for h in json.loads(result.output)["hits"]] == ["coffee"]

    composed_sheet = tmp_path / "composed.png"
    result = cli(double, "search", "--image", str(photos / "train" / "cat.jpg"), "--instruction", "rocket",
                 "--top-k", "1", "--out", str(composed_sheet))
    assert result.exit_code == 0, result.output
    assert "image + text → image" in result.output and composed_sheet.exists()

    result = cli(double, "get", "cat", "--json")
    assert result.exit_code == 0 and json.loads(result.output)["records"][0]["metadata"] == {"label": "cat"}
    result = cli(double, "get", "cat", "nope")
    assert result.exit_code == 1 and "not found: nope" in result.output

    result = cli(double, "delete", "cat", "nope")
    assert result.exit_code == 0 and "deleted 1 of 2" in result.output
    result = cli(double, "stats", "--json")
    assert json.loads(result.output)["item_count"] == 2
    result = cli(double, "stats")
    assert "item count" in result.output and "embedded" in result.output


def test_ingest_folder_with_failures_exits_1_with_reasons(double: RunningDouble, photos: Path) -> None:
    (photos / "train" / "broken.png").write_bytes(b"this is not a png")
    result = cli(double, "ingest", str(photos))
    assert result.exit_code == 1, result.output
    assert "3 stored" in result.output and "1 failed" in result.output
    assert "broken.png" in result.output and "INVALID_ARGUMENT" in result.output and "cannot decode" in result.output


def test_ingest_json_and_local_failures(double: RunningDouble, tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(png_bytes())
    csv_path = tmp_path / "items.csv"
    csv_path.write_text("id,path,label\n1,a.png,x\n2,missing.png,y\n")
    result = cli(double, "ingest", str(csv_path), "--json")
    assert result.exit_code == 1
    data = json.loads(result.output)
    assert (data["stored"], data["failed"]) == (1, 1)
    failed = data["outcomes"][1]
    assert failed["local"] and "file not found" in failed["error_message"] and failed["path"].endswith("missing.png")
    assert failed["error_code"] == "INVALID_ARGUMENT"


def test_ingest_nothing_found(double: RunningDouble, tmp_path: Path) -> None:
    result = cli(double, "ingest", str(tmp_path / "nothing"))
    assert result.exit_code == 1 and "no such file" in result.output


def test_search_argument_errors(double: RunningDouble, tmp_path: Path) -> None:
    assert cli(double, "search").exit_code == 2
    assert cli(double, "search", "--text", "a", "--image", "b.png").exit_code == 2
    assert cli(double, "search", "--text", "a", "--instruction", "b").exit_code == 2
    result = cli(double, "search", "--image", str(tmp_path / "missing.png"))
    assert result.exit_code == 2 and "no such file" in result.output
    assert cli(double, "search", "--text", "a", "--mode", "pixels").exit_code == 2


def test_token_from_environment(double: RunningDouble) -> None:
    double.servicer.knobs.token = "s3cret"
    result = cli(double, "stats")
    assert result.exit_code == 1 and "UNAUTHENTICATED" in result.output and "MMSEARCH_TOKEN" in result.output
    result = cli(double, "stats", env={"MMSEARCH_TOKEN": "s3cret"})
    assert result.exit_code == 0, result.output


def test_unreachable_service_says_how_to_start_it() -> None:
    result = runner.invoke(app, ["--address", "127.0.0.1:1", "--timeout", "2", "stats"])
    assert result.exit_code == 1 and "UNAVAILABLE" in result.output and "mmsearch up" in result.output


def test_health_of_all_services(double: RunningDouble) -> None:
    result = cli(double, "health", "--embedder-address", double.address, "--captioner-address", double.address, "--json")
    assert result.exit_code == 0, result.output
    assert [row["status"] for row in json.loads(result.output)] == ["SERVING"] * 3
    result = cli(double, "health", "--embedder-address", double.address, "--captioner-address", "127.0.0.1:1")
    assert result.exit_code == 1 and "captioner" in result.output and "UNAVAILABLE" in result.output


def test_help_lists_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("up", "ingest", "search", "get", "delete", "stats", "health", "demo"):
        assert command in result.output
