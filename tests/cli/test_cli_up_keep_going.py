"""`mmsearch up` when a service dies after start-up (issue 14).

The real command (`python -m mmsearch.cli.main up`) with the real services as processes;
the embedder and captioner use their DashScope backends against the local protocol fakes
(so the suite starts in seconds), search an embedded Milvus Lite file. The captioner is
killed with SIGKILL:
- by default the launcher stops everything and exits 1, naming the dead service;
- with `--keep-going` it reports the death and keeps the others serving (search answers
  Stats and text search without the captioner); Ctrl-C / SIGTERM still stops everything.
"""
from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmsearch.cli.main import app
from mmsearch.client import ItemStatus, SearchClient
from mmsearch.suite import ManagedProcess, free_port
from tests.captioner.fakes import FakeUpstream
from tests.cli.launcher_support import ROOT, alive, start_up, wait_gone
from tests.conftest import png_bytes
from tests.embedder.dashscope_fake import FakeDashScope
from tests.reliability.helpers import dashscope_fakes

KEY = "sk-keep-going-test-key"
runner = CliRunner()


@pytest.fixture
def fakes() -> Iterator[tuple[FakeUpstream, FakeDashScope]]:
    with dashscope_fakes(KEY, 64) as pair:
        yield pair


def up_with_fakes(fakes: tuple[FakeUpstream, FakeDashScope], data_dir: Path, *extra: str) -> tuple[
        ManagedProcess, dict[str, int], str]:
    cap_fake, emb_fake = fakes
    env = {"PYTHONPATH": str(ROOT), "COLUMNS": "200",
           "EMBEDDER_DASHSCOPE__API_KEY": KEY, "EMBEDDER_DASHSCOPE__BASE_URL": emb_fake.base_url,
           "EMBEDDER_DASHSCOPE__DIMENSION": "64", "CAPTIONER_API_KEY": KEY, "CAPTIONER_BASE_URL": cap_fake.base_url,
           "SEARCH_SHUTDOWN_GRACE_S": "1", "EMBEDDER_SHUTDOWN_GRACE_S": "1", "CAPTIONER_SHUTDOWN_GRACE_S": "1"}
    ports = [free_port() for _ in range(3)]
    proc, state = start_up(data_dir, [
        "--no-metrics", "--quiet", "--embedder-backend", "dashscope", "--captioner-backend", "dashscope",
        "--start-timeout", "120", "--search-port", str(ports[0]), "--embedder-port", str(ports[1]),
        "--captioner-port", str(ports[2]), "--no-gateway", *extra,
    ], services=3, log=data_dir.parent / f"{data_dir.name}-up.log", timeout_s=120, env=env)
    return proc, {p["name"]: p["pid"] for p in state["processes"]}, state["search_address"]


def state_addresses(data_dir: Path) -> dict[str, str]:
    return {p["name"]: p["address"] for p in json.loads((data_dir / "suite.json").read_text())["processes"]}


def output_of(data_dir: Path) -> str:
    return (data_dir.parent / f"{data_dir.name}-up.log").read_text(errors="replace")


def test_by_default_one_dead_service_stops_the_whole_suite(
        fakes: tuple[FakeUpstream, FakeDashScope], tmp_path: Path) -> None:
    data_dir = tmp_path / "default"
    proc, pids, _ = up_with_fakes(fakes, data_dir)
    try:
        os.kill(pids["captioner"], signal.SIGKILL)
        assert proc.wait(60) == 1
        assert "captioner exited unexpectedly" in output_of(data_dir)
        assert wait_gone(list(pids.values()), 10) == [], "the other services were stopped"
    finally:
        proc.stop(grace_s=0)


def test_keep_going_reports_the_death_and_keeps_the_rest_serving(
        fakes: tuple[FakeUpstream, FakeDashScope], tmp_path: Path) -> None:
    data_dir = tmp_path / "keep"
    proc, pids, address = up_with_fakes(fakes, data_dir, "--keep-going", "--defer-captions")
    try:
        os.kill(pids["captioner"], signal.SIGKILL)
        deadline = time.monotonic() + 20
        while "captioner exited unexpectedly" not in output_of(data_dir):
            assert time.monotonic() < deadline, output_of(data_dir)
            time.sleep(0.2)
        time.sleep(1.5)  # a few of the launcher's polls
        assert proc.alive, "the launcher keeps running"
        assert "--keep-going" in output_of(data_dir)
        assert alive(pids["search"]) and alive(pids["embedder"])
        state = {p["name"]: p["alive"] for p in json.loads((data_dir / "suite.json").read_text())["processes"]}
        assert state == {"embedder": True, "captioner": False, "search": True}
        with SearchClient(address, timeout=10) as client:
            assert client.health() == "SERVING"
            assert client.health("ingest.caption") == "NOT_SERVING"
            assert client.stats().item_count == 0
            assert client.search(text="a cat", top_k=3).hits == [], "text search works without the captioner"
            # --defer-captions: an image ingested now is stored with its caption pending.
            summary = client.ingest_all([png_bytes()])
            assert summary.progress.deferred == 1 and summary.outcomes[0].status is ItemStatus.DEFERRED
            assert client.stats().caption_pending_count == 1
        # `mmsearch health` tells degraded from down.
        result = runner.invoke(app, ["--address", address, "health", "--embedder-address", state_addresses(data_dir)[
            "embedder"], "--captioner-address", state_addresses(data_dir)["captioner"], "--json"])
        rows = {r["service"]: r for r in json.loads(result.stdout)}
        assert result.exit_code == 1, "not everything is SERVING"
        assert rows["search"]["status"] == "SERVING" and rows["search"]["degraded"] == ["ingest.caption"]
        assert rows["embedder"]["status"] == "SERVING" and rows["captioner"]["status"] != "SERVING"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert wait_gone(list(pids.values()), 10) == []
    finally:
        proc.stop(grace_s=0)
