"""The client distribution (issue 13): `pip install mmsearch` is the contracts, the Python
client and the CLI's remote commands; the servers are the "server" extra.

1. Importing the client, its asyncio variant, the CLI and the generated stubs loads no
   server-side module (torch, pymilvus, milvus_lite, services, mmsearch.suite).
2. The wheel, installed alone in a fresh virtualenv (its dependencies from the package
   index), brings none of the servers' heavy dependencies, and from there the client and
   the CLI talk to a running suite (`real_suite`); `mmsearch up` / `demo` there say how to
   install the servers and exit 1.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import urllib.request
from importlib import metadata
from pathlib import Path

import pytest

from tests.conftest import RealSuite

ROOT = Path(__file__).resolve().parents[2]

SERVER_MODULES = ("torch", "pymilvus", "milvus_lite", "services", "mmsearch.suite")
CLIENT_MODULES = (
    "mmsearch.client",
    "mmsearch.client.aio",
    "mmsearch.cli.main",
    *(f"mmsearch.{pkg}.v1.{name}{suffix}"
      for pkg, name in (("common", "types"), ("embedder", "embedder"), ("captioner", "captioner"), ("search", "search"))
      for suffix in ("_pb2", "_pb2_grpc")),
)
# Distributions of the "server" extra that a client-only install must not bring.
HEAVY = ("torch", "pymilvus", "milvus-lite", "dashscope", "openai", "scikit-image", "fastapi", "grpcio-reflection",
         "transformers", "numpy")
# The client's dependencies and theirs: pinned to this venv's versions so the resolve is quick.
PINNED = ("grpcio", "grpcio-health-checking", "protobuf", "typer", "rich", "pillow", "click", "typing-extensions",
          "shellingham", "markdown-it-py", "mdurl", "pygments", "annotated-doc")
INSTALL_HINT = 'pip install "mmsearch[server]"'


def clean_env() -> dict[str, str]:
    """No PYTHONPATH: the child must import what its own environment holds, not this checkout."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")} | {
        "COLUMNS": "200", "NO_COLOR": "1"}


def test_client_imports_no_server_module(tmp_path: Path) -> None:
    code = textwrap.dedent(f"""
        import importlib, sys
        for name in {CLIENT_MODULES!r}:
            importlib.import_module(name)
        loaded = sorted(m for m in sys.modules
                        if any(m == s or m.startswith(s + ".") for s in {SERVER_MODULES!r}))
        assert not loaded, f"the client imported server-side modules: {{loaded}}"
        """)
    run = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, env=clean_env() | {"PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


# ---------------------------------------------------------------------------- a client-only venv


def pypi_reachable() -> bool:
    try:
        with urllib.request.urlopen("https://pypi.org/simple/grpcio/", timeout=5):
            return True
    except OSError:
        return False


def run(args: list[str], *, cwd: Path, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, check=False, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv holding the mmsearch wheel and only what its base distribution needs."""
    work = tmp_path_factory.mktemp("client-dist")
    # Build from a copy of the sources: setuptools writes build/ and *.egg-info next to them,
    # and the working tree is shared with other runs.
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for pkg in ("mmsearch", "services"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=ignore)
    wheels = work / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)],
        cwd=work)
    (wheel,) = wheels.glob("mmsearch-*.whl")

    venv = work / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=work)
    constraints = work / "constraints.txt"
    pins = []
    for name in PINNED:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    constraints.write_text("\n".join(pins) + "\n")
    # This venv's pip installs into the new one (--python): no ensurepip run, no pip in it.
    install = run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                   "-c", str(constraints), str(wheel)], cwd=work, timeout=300, check=False)
    if install.returncode != 0:
        if not pypi_reachable():
            pytest.skip("PyPI cannot be reached: the client wheel's dependencies (grpcio, protobuf, typer, rich, "
                        f"Pillow) cannot be installed into a fresh venv\n{install.stderr[-2000:]}")
        pytest.fail(f"pip install of the client wheel failed:\n{install.stdout}\n{install.stderr}")
    return venv


def test_client_only_install_talks_to_a_running_suite(client_venv: Path, real_suite: RealSuite,
                                                       tmp_path: Path) -> None:
    python = str(client_venv / "bin" / "python")
    mmsearch = str(client_venv / "bin" / "mmsearch")

    # What the wheel brought: the client's dependencies, none of the servers'.
    names = "import json, importlib.metadata as m; print(json.dumps(sorted(d.metadata['Name'].lower() for d in m.distributions())))"
    listing = run([python, "-c", names], cwd=tmp_path)
    installed = set(json.loads(listing.stdout))
    assert {"mmsearch", "grpcio", "grpcio-health-checking", "protobuf", "typer", "rich"} <= installed, installed
    assert not installed & set(HEAVY), f"the client distribution installed {sorted(installed & set(HEAVY))}"

    # The Python client, from that venv (cwd outside the checkout, no PYTHONPATH).
    script = tmp_path / "client_check.py"
    script.write_text(textwrap.dedent(f"""
        import io, json, sys
        from PIL import Image
        import mmsearch
        from mmsearch.client import IngestItem, ItemStatus, SearchClient
        assert mmsearch.__file__.startswith({str(client_venv)!r}), mmsearch.__file__
        buf = io.BytesIO()
        Image.new("RGB", (32, 24), (12, 200, 90)).save(buf, format="PNG")
        with SearchClient({real_suite.address!r}, token={real_suite.token!r}, timeout=60.0) as client:
            stats = client.stats()
            summary = client.ingest_all([IngestItem(image=buf.getvalue(), id="client-dist-1",
                                                    caption="a green square from the client-only venv",
                                                    metadata={{"label": "client-dist"}})])
            assert [o.status for o in summary.outcomes] in ([ItemStatus.STORED], [ItemStatus.UNCHANGED]), summary
            got = client.get(["client-dist-1"])
            assert got.records[0].caption == "a green square from the client-only venv", got
            hits = client.search("a green square", target="caption", filter='id == "client-dist-1"', top_k=3)
            assert [h.id for h in hits] == ["client-dist-1"], hits
        loaded = sorted(m for m in sys.modules
                        if any(m == s or m.startswith(s + ".") for s in {SERVER_MODULES!r}))
        assert not loaded, loaded
        print(json.dumps({{"collection": stats.collection}}))
        """))
    out = run([python, str(script)], cwd=tmp_path, timeout=120)
    assert json.loads(out.stdout.strip().splitlines()[-1])["collection"]

    # The CLI's remote commands.
    remote = [mmsearch, "--address", real_suite.address, "--token", real_suite.token]
    health = run([*remote, "health", "--json", "--embedder-address", real_suite.embedder_address,
                  "--captioner-address", real_suite.captioner_address], cwd=tmp_path, timeout=60)
    assert {row["service"]: row["status"] for row in json.loads(health.stdout)} == {
        "search": "SERVING", "embedder": "SERVING", "captioner": "SERVING"}
    found = run([*remote, "search", "--text", "a green square", "--mode", "caption", "--filter",
                 'id == "client-dist-1"', "--json"], cwd=tmp_path, timeout=60)
    assert [h["id"] for h in json.loads(found.stdout)["hits"]] == ["client-dist-1"]

    # The local-suite commands: one line saying how to install the servers, exit 1.
    for command in (["up", "--data-dir", str(tmp_path / "var")], ["demo", "--out", str(tmp_path / "demo")]):
        proc = run([mmsearch, *command], cwd=tmp_path, timeout=60, check=False)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert INSTALL_HINT in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not (tmp_path / "var").exists() and not (tmp_path / "demo").exists()
