"""End to end: `mmsearch up` (real embedder, captioner, search, embedded Milvus Lite, offline
lite models) driven by the CLI: ingest a CSV, search in every mode with contact sheets,
get / delete / stats, health, and no process left after `up` is stopped. The demo itself
runs end to end in test_cli_e2e_demo.py (its own suite) and test_cli_demo.py (`--address`).

Slow (models load on CPU); marked `slow` but part of the normal test run.
"""
from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from mmsearch.cli.demo import write_photos
from mmsearch.cli.main import app
from mmsearch.client import SearchClient
from mmsearch.suite import ManagedProcess, free_port
from tests.cli.launcher_support import ROOT, alive, start_up, wait_gone

SERVICES = ("embedder", "captioner", "search")
_missing = [s for s in SERVICES if not (ROOT / "services" / s / "__main__.py").exists()]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(_missing), reason=f"services not in the tree yet: {_missing}"),
]

runner = CliRunner()
START_TIMEOUT_S = 540


@dataclass
class Up:
    proc: ManagedProcess
    address: str
    data_dir: Path
    log: Path
    pids: list[int]
    photos_csv: Path
    queries: Path

    def cli(self, *args: str):
        return runner.invoke(app, ["--address", self.address, "--timeout", "120", *args])

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-60:])


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    base = tmp_path_factory.mktemp("e2e")
    data_dir = base / "var"
    csv_path, queries = write_photos(base / "demo-input")
    ports = {name: free_port() for name in SERVICES}
    log = base / "up.log"
    proc, state = start_up(data_dir, [
        "--search-port", str(ports["search"]),
        "--embedder-port", str(ports["embedder"]),
        "--captioner-port", str(ports["captioner"]),
        "--no-metrics",
        "--no-gateway",  # the three gRPC services; tests/gateway runs `up` with the gateway
        "--start-timeout", str(START_TIMEOUT_S),
    ], services=2, log=log, timeout_s=START_TIMEOUT_S * 1.5,  # models (embedder + captioner), search
        env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    address = f"127.0.0.1:{ports['search']}"
    try:
        with SearchClient(address) as client:
            client.wait_until_ready(timeout=60)
        yield Up(proc, address, data_dir, log, [p["pid"] for p in state["processes"]], csv_path, queries)
    finally:
        proc.stop(grace_s=60)


def _sheet_checks(path: Path, output: str, hits: int) -> None:
    with Image.open(path) as png:
        assert png.format == "PNG"
        size = png.size
    assert f"{size[0]}x{size[1]}, {hits + 1} tiles" in output


def test_ingest_csv(up: Up) -> None:
    result = up.cli("ingest", str(up.photos_csv))
    assert result.exit_code == 0, result.output + up.log_tail()
    assert "17 stored" in result.output and "0 failed" in result.output
    again = up.cli("ingest", str(up.photos_csv))
    assert again.exit_code == 0 and "17 unchanged" in again.output


@pytest.mark.parametrize(
    ("name", "args", "expected_top"),
    [
        ("text-image", ["--text", "a cat"], "cat"),
        ("text-image-coffee", ["--text", "a cup of coffee"], "coffee"),
        ("text-text", ["--text", "a cup of espresso", "--mode", "caption"], None),
        ("image-image", ["--image", "{flipped}"], "cat"),
        ("image-text", ["--image", "{flipped}", "--mode", "caption"], None),
        ("composed", ["--image", "{flipped}", "--instruction", "a cup of coffee"], None),
        ("hybrid-rrf", ["--text", "a tabby cat", "--mode", "hybrid"], "cat"),
        ("hybrid-weighted", ["--image", "{flipped}", "--mode", "hybrid", "--fusion", "weighted"], "cat"),
    ],
)
def test_search_every_mode_with_contact_sheet(up: Up, tmp_path: Path, name: str, args: list[str], expected_top: str | None) -> None:
    args = [a.replace("{flipped}", str(up.queries / "cat_flipped.jpg")) for a in args]
    sheet = tmp_path / f"{name}.png"
    result = up.cli("search", *args, "--top-k", "5", "--out", str(sheet))
    assert result.exit_code == 0, result.output + up.log_tail()
    _sheet_checks(sheet, result.output, 5)
    data = json.loads(up.cli("search", *args, "--top-k", "5", "--json").output)
    hits = data["hits"]
    assert len(hits) == 5 and [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert all(h["caption"] for h in hits)
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    if expected_top:
        assert hits[0]["id"] == expected_top, [h["id"] for h in hits]


def test_filter_and_pagination(up: Up) -> None:
    expr = 'metadata["label"] == "coffee" or metadata["label"] == "rocket"'
    data = json.loads(up.cli("search", "--text", "a cat", "--filter", expr, "--json").output)
    assert {h["id"] for h in data["hits"]} == {"coffee", "rocket"}
    first = json.loads(up.cli("search", "--text", "a cat", "--top-k", "4", "--json").output)["hits"]
    page2 = json.loads(up.cli("search", "--text", "a cat", "--top-k", "2", "--offset", "2", "--json").output)["hits"]
    assert [h["id"] for h in page2] == [h["id"] for h in first[2:4]] and page2[0]["rank"] == 3


def test_get_delete_stats(up: Up) -> None:
    stats = json.loads(up.cli("stats", "--json").output)
    assert stats["item_count"] == 17 and stats["dimension"] > 0 and stats["milvus_mode"] == "embedded"
    got = json.loads(up.cli("get", "gravel", "--json").output)
    assert got["records"][0]["metadata"]["label"] == "gravel" and got["records"][0]["caption"]
    result = up.cli("delete", "gravel")
    assert result.exit_code == 0 and "deleted 1 of 1" in result.output
    assert json.loads(up.cli("stats", "--json").output)["item_count"] == 16
    assert up.cli("get", "gravel").exit_code == 1


def test_health_of_every_service(up: Up) -> None:
    state = json.loads((up.data_dir / "suite.json").read_text())
    addresses = {p["name"]: p["address"] for p in state["processes"]}
    # With the lite backends one models process serves both contracts (mmsearch/suite/launcher.py).
    embedder, captioner = (addresses.get(n, addresses.get("models")) for n in ("embedder", "captioner"))
    result = up.cli("health", "--embedder-address", embedder, "--captioner-address", captioner, "--json")
    assert result.exit_code == 0, result.output
    assert [r["status"] for r in json.loads(result.output)] == ["SERVING"] * 3


def test_up_stops_every_process_on_sigterm(up: Up) -> None:
    assert all(alive(p) for p in up.pids)
    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(90) == 0
    assert wait_gone(up.pids, 10) == []
    assert not (up.data_dir / "suite.json").exists()
    assert "stopped: all services shut down" in up.log.read_text(errors="replace")
