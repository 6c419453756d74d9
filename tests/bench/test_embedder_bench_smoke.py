"""CI smoke run of bench/embedder_bench.py: the whole benchmark, tiny, on a random tiny
CLIP checkpoint (loaded through the production loader). Not a timed test: it asserts only
that the script runs and prints its table, the batch column and the hop split."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_embedder_bench_runs_and_prints_its_tables() -> None:
    argv = [sys.executable, str(ROOT / "bench" / "embedder_bench.py"), "--backend", "clip", "--random-clip", "tiny",
            "--device", "cpu", "--modalities", "text,image", "--batch", "4", "--clients", "4", "--seconds", "0.3",
            "--latency-n", "10", "--torch-threads", "1"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "| mean model batch |" in out
    for modality in ("text", "image"):
        assert f"| {modality}  " in out and "service, 4 clients x batch 1" in out
    assert "hop overhead" in out and "a bare grpc.aio call that waits" in out
