"""`mmsearch search`'s issue 21 options through typer's CliRunner against the real suite
(`real_suite` in tests/conftest.py; its collection indexes label:string, price:float):
each option reaches the server and the result makes sense; bad combinations exit 2."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmsearch.cli.main import app, parse_legs
from mmsearch.client import IngestItem, SearchClient
from services.lite_models.sample_photos import load_sample_photos
from tests.conftest import RealSuite

runner = CliRunner()  # click >= 8.2: result.stdout and result.stderr apart, result.output both
PREFIX = "clifeat-"
MINE = f'id like "{PREFIX}%"'


def cli(suite: RealSuite, *args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, ["--address", suite.address, "--timeout", "120", *args],
                         env={"MMSEARCH_TOKEN": suite.token})


def hits(result) -> list[str]:  # type: ignore[no-untyped-def]
    assert result.exit_code == 0, result.output
    return [h["id"] for h in json.loads(result.stdout)["hits"]]


@pytest.fixture(scope="module")
def photos(real_suite: RealSuite, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli-features")
    captions = {"cat": "a cat sitting on a sofa", "coffee": "a cup of coffee on a table",
                "rocket": "a rocket launching into the sky, serial wombatix", "coins": "old coins on a cloth"}
    items = []
    for photo in load_sample_photos(list(captions)):
        for q in (92, 80):
            path = root / f"{photo.name}-{q}.jpg"
            photo.image.convert("RGB").save(path, format="JPEG", quality=q)
            items.append(IngestItem(image=path, id=f"{PREFIX}{photo.name}-{q}", caption=captions[photo.name],
                                    metadata={"label": photo.name, "price": float(q)}))
    for i in range(25):
        items.append(IngestItem(image=root / "coins-92.jpg", id=f"{PREFIX}all-{i:02d}", caption=f"coins {i}",
                                metadata={"label": "many"}))
    with SearchClient(real_suite.address, token=real_suite.token, timeout=120) as client:
        assert client.ingest_all(items).ok
    return root


def test_mode_keyword_and_legs(real_suite: RealSuite, photos: Path) -> None:
    result = cli(real_suite, "search", "--text", "wombatix", "--mode", "keyword", "--filter", MINE, "--json")
    assert hits(result) == [f"{PREFIX}rocket-92", f"{PREFIX}rocket-80"]
    assert json.loads(result.stdout)["target"] == "keyword"
    assert json.loads(result.stdout)["query"]["label"] == "text → keyword"
    result = cli(real_suite, "search", "--text", "wombatix", "--legs", "image=0.1,caption=0.1,keyword=0.8",
                 "--filter", MINE, "--top-k", "2", "--json")
    assert set(hits(result)) == {f"{PREFIX}rocket-92", f"{PREFIX}rocket-80"}
    assert json.loads(result.stdout)["target"] == "hybrid"
    table = cli(real_suite, "search", "--text", "a cup of coffee", "--legs", "image,caption,keyword", "--filter",
                MINE, "--top-k", "1")
    assert table.exit_code == 0 and f"{PREFIX}coffee-" in table.stdout and "text → hybrid" in table.stdout


def test_like_excludes_the_item(real_suite: RealSuite, photos: Path) -> None:
    result = cli(real_suite, "search", "--like", f"{PREFIX}cat-92", "--filter", MINE, "--top-k", "3", "--json")
    found = hits(result)
    assert f"{PREFIX}cat-92" not in found and found[0] == f"{PREFIX}cat-80"
    assert json.loads(result.stdout)["query"]["label"] == f"like {PREFIX}cat-92 → image"


def test_not_demotes(real_suite: RealSuite, photos: Path) -> None:
    base = ["search", "--filter", f'{MINE} and label != "many"', "--top-k", "8", "--json"]
    plain = hits(cli(real_suite, *base, "--example", str(photos / "cat-92.jpg")))
    assert plain[0].startswith(f"{PREFIX}cat-")
    pushed = hits(cli(real_suite, *base, "--text", "a photo of a cat", "--not", f"id:{PREFIX}cat-92",
                      "--not", str(photos / "cat-80.jpg")))
    assert pushed.index(f"{PREFIX}cat-92") > plain.index(f"{PREFIX}cat-92")
    assert not any(i.startswith(f"{PREFIX}cat-") for i in pushed[:2]), pushed


def test_min_score_group_by_and_recency(real_suite: RealSuite, photos: Path) -> None:
    every = json.loads(cli(real_suite, "search", "--image", str(photos / "cat-92.jpg"), "--filter", MINE,
                           "--top-k", "6", "--json").stdout)["hits"]
    threshold = every[2]["score"]
    kept = json.loads(cli(real_suite, "search", "--image", str(photos / "cat-92.jpg"), "--filter", MINE,
                          "--top-k", "6", "--min-score", str(threshold), "--json").stdout)["hits"]
    assert 0 < len(kept) < len(every) and all(h["score"] >= threshold - 1e-6 for h in kept)
    grouped = cli(real_suite, "search", "--image", str(photos / "cat-92.jpg"), "--filter", MINE, "--top-k", "4",
                  "--group-by", "label", "--group-size", "1", "--json")
    labels = [h["metadata"]["label"] for h in json.loads(grouped.stdout)["hits"]]
    assert len(labels) == 4 and len(set(labels)) == 4, labels
    recent = cli(real_suite, "search", "--text", "a cat", "--filter", MINE, "--top-k", "3", "--boost-recency", "7d",
                 "--json")
    assert len(hits(recent)) == 3


def test_all_streams_json_lines_in_rank_order(real_suite: RealSuite, photos: Path) -> None:
    result = cli(real_suite, "search", "--text", "old coins", "--filter", f'id like "{PREFIX}all-%"', "--all",
                 "--batch-size", "4")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [h["rank"] for h in lines] == list(range(1, 26))
    assert len({h["id"] for h in lines}) == 25 and all(h["id"].startswith(f"{PREFIX}all-") for h in lines)
    assert all(a["score"] >= b["score"] - 1e-6 for a, b in itertools.pairwise(lines))
    assert "25 hits streamed" in result.stderr
    limited = cli(real_suite, "search", "--text", "old coins", "--filter", f'id like "{PREFIX}all-%"', "--all",
                  "--limit", "5")
    assert len(limited.stdout.splitlines()) == 5


@pytest.mark.parametrize(("args", "message"), [
    (["--text", "a", "--like", "x"], "exactly one query"),
    (["--not", "a cat"], "--not needs something to be like"),
    (["--text", "a", "--mode", "image", "--legs", "image,caption"], "--legs fuses several legs"),
    (["--text", "a", "--legs", "image=0.5,caption"], "with a weight each"),
    (["--text", "a", "--legs", "pixels"], "unknown leg"),
    (["--example", "a cat", "--mode", "keyword"], "--mode keyword"),
    (["--text", "a", "--group-size", "2"], "--group-size needs --group-by"),
    (["--text", "a", "--group-by", "label", "--offset", "3"], "--group-by does not page"),
    (["--text", "a", "--boost-recency", "soon"], "bad duration"),
    (["--text", "a", "--all", "--mode", "hybrid"], "--all streams one vector target"),
    (["--text", "a", "--all", "--mode", "keyword"], "--all streams one vector target"),
    (["--text", "a", "--all", "--group-by", "label"], "leave out --group-by"),
    (["--text", "a", "--all", "--boost-recency", "1d"], "leave out --boost-recency"),
])
def test_bad_combinations_are_clear_errors(args: list[str], message: str) -> None:
    result = runner.invoke(app, ["--address", "127.0.0.1:1", "search", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_server_side_errors_are_reported(real_suite: RealSuite, photos: Path) -> None:
    result = cli(real_suite, "search", "--like", f"{PREFIX}nope")
    assert result.exit_code == 1 and "INVALID_ARGUMENT" in result.output and "not stored" in result.output
    result = cli(real_suite, "search", "--text", "a", "--group-by", "colour")
    assert result.exit_code == 1 and "colour" in result.output


def test_parse_legs() -> None:
    assert parse_legs("image,keyword") == ["image", "keyword"]
    assert parse_legs("image=0.5, caption=0.3,keyword=0.2") == {"image": 0.5, "caption": 0.3, "keyword": 0.2}


def test_stats_shows_the_new_fields(real_suite: RealSuite) -> None:
    data = json.loads(cli(real_suite, "stats", "--json").stdout)
    assert data["keyword_index"] is True and "label:string" in data["indexed_fields"]
    assert "indexed fields" in cli(real_suite, "stats").stdout
