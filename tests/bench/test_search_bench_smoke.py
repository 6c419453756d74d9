"""CI smoke run of the search benchmarks under bench/: each script runs end to end with
tiny parameters against one shared suite (embedder, captioner, search as processes).

Benchmarks are not tests: nothing here asserts anything about time or rates, only that
every script still runs and prints its tables.
"""
from __future__ import annotations

import asyncio
import importlib
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import common as C

# (module, argv) in run order; concurrency restarts the search process, so it runs last.
RUNS = [
    ("bench.search_recall", ["--n", "1000", "--queries", "5", "--indexes", "FLAT,HNSW", "--hnsw-ef", "16"]),
    ("bench.search_overhead", ["--milvus", "embedded", "--n", "3", "--warmup", "1", "--images", "2"]),
    ("bench.search_ingest", ["--images", "2", "--single-items", "1"]),
    ("bench.search_memory", ["--duration", "1", "--images", "2", "--every", "0.5", "--idle-after", "0"]),
    ("bench.search_scale", ["--sizes", "200", "--milvus", "embedded", "--n", "3", "--no-adaptive",
                            "--qps-seconds", "0.3", "--clients", "2"]),
    ("bench.search_profile", ["--load", "vector", "--seconds", "2", "--images", "2", "--clients", "1"]),
    ("bench.search_features", ["--sizes", "60", "--n", "2"]),
    ("bench.search_concurrency", ["--clients", "1,2", "--seconds", "0.5", "--images", "2", "--limit-active", "1",
                                  "--limit-waiting", "1"]),
]


@pytest.fixture(scope="module")
def suite() -> Iterator[C.Suite]:
    running = asyncio.run(C.Suite(search_metrics=True).start())
    C.share(running)
    try:
        yield running
    finally:
        C.share(None)
        running.cleanup()


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("module", "argv"), RUNS, ids=[m.rsplit(".", 1)[1] for m, _ in RUNS])
def test_benchmark_runs(module: str, argv: list[str], suite: C.Suite, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str]) -> None:
    profile = module.endswith("search_profile")
    if profile and not (shutil.which("py-spy") or Path(sys.executable).with_name("py-spy").exists()):
        pytest.skip("py-spy is not installed")
    bench = importlib.import_module(module)
    monkeypatch.setattr(sys, "argv", [module, *argv])
    bench.main()
    out = capsys.readouterr().out
    assert "machine:" in out
    if not profile:  # py-spy may lack ptrace permission in CI; the script still has to run
        assert "\n| " in out, out[-2000:]  # at least one table
