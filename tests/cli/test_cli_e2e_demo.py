"""The README's main job, literally: `bash scripts/demo.sh OUT` starts its own suite on free
ports, indexes the sample photos, runs every query, writes the contact sheets, stops the suite.

Slow (a full suite start with model loading); marked `slow` but part of the normal test run.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from mmsearch.cli.demo import QUERIES
from tests.cli.launcher_support import ROOT

_missing = [s for s in ("embedder", "captioner", "search") if not (ROOT / "services" / s / "__main__.py").exists()]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(_missing), reason=f"services not in the tree yet: {_missing}"),
    pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "activate").exists(), reason="scripts/demo.sh needs .venv"),
]


def _processes_mentioning(marker: str) -> list[int]:
    """Pids whose command line or environment names `marker` (our children carry OUT/var paths)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            blob = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in blob and state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def test_demo_script_runs_the_main_job(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = subprocess.run(
        ["bash", "scripts/demo.sh", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("MMSEARCH_")},
    )
    logs = result.stdout + result.stderr
    assert result.returncode == 0, logs[-6000:]
    assert "17 stored" in logs and "top hit: cat ✓ (expected cat)" in logs
    sheets = sorted((out / "sheets").glob("*.png"))
    assert len(sheets) == len(QUERIES)
    for sheet in sheets:
        with Image.open(sheet) as png:
            assert png.format == "PNG" and png.size[0] >= 600 and png.size[1] >= 600
    assert (out / "index.html").exists() and str(out / "sheets") in logs.replace("\n", "")
    assert not (out / "var" / "suite.json").exists()
    assert {p.stem for p in (out / "var" / "logs").glob("*.log")} == {"models", "search"}  # the laptop shape
    assert _processes_mentioning(str(out)) == []  # the suite it started is gone
