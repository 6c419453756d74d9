"""Helpers for the launcher tests: fake child specs, `mmsearch up` as a process, and a
zombie-aware liveness check."""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmsearch.suite import ManagedProcess, ProcessSpec, free_port

ROOT = Path(__file__).resolve().parents[2]


def fake_spec(name: str, mode: str, data_dir: Path, grandchild: bool = False) -> ProcessSpec:
    port = free_port()
    argv = [sys.executable, "-m", "tests.cli.fake_service", "--port", str(port), "--mode", mode,
            "--pidfile", str(data_dir / f"{name}.pids")]
    if grandchild:
        argv.append("--grandchild")
    env = {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return ProcessSpec(name=name, argv=argv, address=f"127.0.0.1:{port}", env=env, cwd=str(ROOT))


def start_up(data_dir: Path, args: list[str], *, services: int, log: Path, timeout_s: float,
             env: Mapping[str, str] | None = None) -> tuple[ManagedProcess, dict[str, Any]]:
    """`mmsearch up --data-dir DATA_DIR ARGS` as a process of the launcher (its output in
    `log`); returns it and its suite.json once that lists `services` services, all ready.
    SuiteError (quoting its output) when it exits first or takes longer than `timeout_s`."""
    state_file = data_dir / "suite.json"

    def every_service_ready(_address: str) -> bool:
        try:
            processes = json.loads(state_file.read_text())["processes"]
        except (OSError, ValueError, KeyError):
            return False
        return len(processes) == services and all(p["ready"] for p in processes)

    argv = [sys.executable, "-m", "mmsearch.cli.main", "up", "--data-dir", str(data_dir), *args]
    up = ManagedProcess(ProcessSpec("mmsearch up", argv, str(state_file), dict(env or {}), ready=every_service_ready,
                                    cwd=str(ROOT)), log_file=log, tail_lines=100)
    try:
        up.start().wait_ready(timeout_s)
    except BaseException:
        up.stop(grace_s=0)
        raise
    return up, json.loads(state_file.read_text())


def pids_of(data_dir: Path, name: str) -> list[int]:
    """The child's pid and its grandchild's (0 entries dropped)."""
    text = (data_dir / f"{name}.pids").read_text().split()
    return [int(p) for p in text if int(p)]


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (PID 1 in containers may not reap)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_gone(pids: list[int], timeout_s: float = 10.0) -> list[int]:
    """Waits for every pid to disappear; returns the ones still alive after the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = [p for p in pids if alive(p)]
        if not left:
            return []
        time.sleep(0.05)
    return [p for p in pids if alive(p)]
