"""The suite launcher's process handling, with small fake children (real gRPC health servers)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmsearch.suite import LocalSuite, SuiteConfig, SuiteError, format_log_line
from tests.cli.launcher_support import ROOT, alive, fake_spec, pids_of, wait_gone


def _suite(tmp_path: Path, specs, **config) -> LocalSuite:
    lines: list[tuple[str, str]] = []
    suite = LocalSuite(
        SuiteConfig(data_dir=tmp_path, **{"start_timeout_s": 20, "stop_grace_s": 5, **config}),
        processes=specs,
        on_line=lambda name, line: lines.append((name, line)),
    )
    suite.lines = lines  # type: ignore[attr-defined]
    return suite


def test_children_start_together_are_reported_ready_in_order_and_stop_with_their_process_groups(
    tmp_path: Path,
) -> None:
    ready: list[str] = []
    specs = [fake_spec("first", "serving", tmp_path, grandchild=True), fake_spec("second", "serving", tmp_path)]
    suite = LocalSuite(
        SuiteConfig(data_dir=tmp_path, start_timeout_s=20, stop_grace_s=5),
        processes=specs,
        on_line=lambda *_: None,
        on_ready=lambda name, address, took: ready.append(name),
    )
    with suite:
        assert ready == ["first", "second"]
        first, second = suite.processes
        assert first.ready_after_s is not None
        assert second.started_at < first.started_at + first.ready_after_s  # not after the first was ready
        state = json.loads(suite.state_file.read_text())
        assert [p["name"] for p in state["processes"]] == ["first", "second"]
        assert state["launcher_pid"] == os.getpid() and all(p["ready"] for p in state["processes"])
        pids = pids_of(tmp_path, "first") + pids_of(tmp_path, "second")
        assert len(pids) == 3 and all(alive(p) for p in pids)
        suite.check()  # all alive: no error
    assert wait_gone(pids, 5) == []  # the grandchild `sleep` went with its group
    assert not suite.state_file.exists()
    assert "started" in (tmp_path / "logs" / "first.log").read_text()


def test_child_that_never_serves_is_a_clear_error_and_leaves_no_process(tmp_path: Path) -> None:
    specs = [fake_spec("ok", "serving", tmp_path), fake_spec("stuck", "never", tmp_path, grandchild=True)]
    suite = _suite(tmp_path, specs, start_timeout_s=3)
    started = time.monotonic()
    with pytest.raises(SuiteError) as err:
        suite.start()
    assert time.monotonic() - started < 15
    message = str(err.value)
    assert "stuck did not become ready" in message and "within 3s" in message and "NOT_SERVING" in message
    assert "last" in message and "waiting for a model that never loads" in message
    assert err.value.name == "stuck"
    assert wait_gone(pids_of(tmp_path, "stuck") + pids_of(tmp_path, "ok"), 5) == []
    assert suite.processes == [] and not suite.state_file.exists()


def test_child_that_crashes_quotes_its_traceback(tmp_path: Path) -> None:
    suite = _suite(tmp_path, [fake_spec("broken", "crash", tmp_path)])
    with pytest.raises(SuiteError) as err:
        suite.start()
    message = str(err.value)
    assert "broken exited with code 3 while starting" in message
    assert "RuntimeError: model file missing" in message
    assert ("broken", "RuntimeError: model file missing") in suite.lines  # type: ignore[attr-defined]


def test_child_ignoring_sigterm_is_killed_after_the_grace_period(tmp_path: Path) -> None:
    suite = _suite(tmp_path, [fake_spec("stubborn", "stubborn", tmp_path)], stop_grace_s=1)
    suite.start()
    pid = pids_of(tmp_path, "stubborn")[0]
    started = time.monotonic()
    suite.stop()
    assert 0.9 < time.monotonic() - started < 10
    assert not alive(pid)


def test_a_child_dying_later_is_reported(tmp_path: Path) -> None:
    suite = _suite(tmp_path, [fake_spec("mortal", "serving", tmp_path)])
    with suite:
        os.kill(pids_of(tmp_path, "mortal")[0], signal.SIGKILL)
        time.sleep(0.3)
        with pytest.raises(SuiteError, match="mortal exited unexpectedly"):
            suite.check()


def test_second_suite_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "suite.json").write_text(json.dumps({"launcher_pid": os.getppid(), "search_address": "127.0.0.1:1"}))
    with pytest.raises(SuiteError, match="already running"):
        _suite(tmp_path, [fake_spec("x", "serving", tmp_path)]).start()
    # a stale file (its launcher is gone) is ignored
    (tmp_path / "suite.json").write_text(json.dumps({"launcher_pid": 2**22 + 7}))
    with _suite(tmp_path, [fake_spec("x", "serving", tmp_path)]):
        pass


def _ignore_sigint() -> None:  # what a shell does to a background job
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _start_launcher(tmp_path: Path, n: int) -> tuple[subprocess.Popen[str], list[int]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "tests.cli.fake_launcher", str(tmp_path), str(n)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        preexec_fn=_ignore_sigint,  # noqa: PLW1509 - single-threaded enough for one signal() call
    )
    assert launcher.stdout is not None
    assert launcher.stdout.readline().strip() == "READY"
    pids = [p for i in range(n) for p in pids_of(tmp_path, f"child{i}")]
    assert len(pids) == 2 * n and all(alive(p) for p in pids)
    return launcher, pids


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_to_the_launcher_stops_every_child(tmp_path: Path, sig: int) -> None:
    launcher, pids = _start_launcher(tmp_path, 2)
    launcher.send_signal(sig)
    assert launcher.wait(timeout=20) == 0
    assert launcher.stdout is not None and "STOPPED" in launcher.stdout.read()
    assert wait_gone(pids, 5) == []
    assert not (tmp_path / "suite.json").exists()


def test_sigkill_of_the_launcher_still_leaves_no_child(tmp_path: Path) -> None:
    launcher, pids = _start_launcher(tmp_path, 1)
    child = pids[0]
    launcher.kill()  # no chance to clean up: the kernel's parent-death signal does it
    launcher.wait(timeout=10)
    assert wait_gone([child], 10) == []


def test_format_log_line() -> None:
    level, text = format_log_line('{"event": "started", "level": "info", "port": 5, "timestamp": "t", "logger": "x"}')
    assert (level, text) == ("info", "started port=5")
    assert format_log_line("plain text") == ("", "plain text")
    assert format_log_line("{not json") == ("", "{not json")


def test_service_specs_wire_ports_milvus_and_backends(tmp_path: Path) -> None:
    suite = LocalSuite(SuiteConfig(data_dir=tmp_path, ports="auto", embedder_backend="clip", file_root=tmp_path))
    names = [s.name for s in suite.specs]
    assert names == ["embedder", "captioner", "search"]
    env = {s.name: s.env for s in suite.specs}
    assert env["embedder"]["EMBEDDER_BACKEND"] == "clip" and "CAPTIONER_BACKEND" not in env["captioner"]
    assert env["embedder"]["EMBEDDER_HOST"] == "127.0.0.1" and env["embedder"]["EMBEDDER_METRICS_PORT"] == "0"
    search = env["search"]
    assert search["SEARCH_MILVUS_URI"] == str(tmp_path.resolve() / "mmsearch.db")
    assert search["SEARCH_EMBEDDER_TARGET"] == suite.embedder_address == f"127.0.0.1:{env['embedder']['EMBEDDER_GRPC_PORT']}"
    assert search["SEARCH_CAPTIONER_TARGET"] == suite.captioner_address
    assert search["SEARCH_URIS__FILE_ROOT"] == str(tmp_path.resolve()) and search["SEARCH_LOG_JSON"] == "true"

    defaults = LocalSuite(SuiteConfig(data_dir=tmp_path, metrics=False))
    assert defaults.search_address == "127.0.0.1:50050" and defaults.embedder_address == "127.0.0.1:50051"
    # Both backends lite (the default): one models process serves the embedder and the captioner.
    assert [s.name for s in defaults.specs] == ["models", "search"]
    assert defaults.specs[0].argv[-1] == "services.models" and defaults.specs[0].env["MODELS_METRICS_PORT"] == "-1"
    assert defaults.specs[0].env["MODELS_GRPC_PORT"] == "50051" and defaults.captioner_address == "127.0.0.1:50051"
    assert defaults.specs[-1].env["SEARCH_EMBEDDER_TARGET"] == defaults.specs[-1].env["SEARCH_CAPTIONER_TARGET"]
    split = LocalSuite(SuiteConfig(data_dir=tmp_path, metrics=False, models_process=False))
    assert [s.name for s in split.specs] == ["embedder", "captioner", "search"]
    assert split.specs[0].env["EMBEDDER_METRICS_PORT"] == "-1" and split.captioner_address == "127.0.0.1:50052"

    external = LocalSuite(SuiteConfig(data_dir=tmp_path, milvus_uri="http://10.0.0.9:19530"))
    assert external.specs[0].name == "models"
    assert external.specs[-1].env["SEARCH_MILVUS_URI"] == "http://10.0.0.9:19530"
    with pytest.raises(ValueError, match="milvus_uri"):
        SuiteConfig(milvus="external")


def test_model_processes_split_the_cores_unless_the_user_chose(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(8)))
    two = SuiteConfig(data_dir=tmp_path, ports="auto", models_process=False)
    env = {s.name: s.env for s in LocalSuite(two).specs}
    assert env["embedder"]["OMP_NUM_THREADS"] == env["captioner"]["OMP_NUM_THREADS"] == "4"
    assert "OMP_NUM_THREADS" not in env["search"]
    # One models process (the lite default): its forwards get half the cores too, the decode
    # and preprocess workers beside them the rest.
    env = {s.name: s.env for s in LocalSuite(SuiteConfig(data_dir=tmp_path, ports="auto")).specs}
    assert env["models"]["OMP_NUM_THREADS"] == "4" and env["models"]["EMBEDDER_MODEL_THREADS"] == "2"
    assert "OMP_NUM_THREADS" not in env["search"]
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0})
    env = {s.name: s.env for s in LocalSuite(two).specs}
    assert env["embedder"]["OMP_NUM_THREADS"] == "1"
    chosen = LocalSuite(SuiteConfig(data_dir=tmp_path, ports="auto", env={"OMP_NUM_THREADS": "3"}))
    assert {s.env["OMP_NUM_THREADS"] for s in chosen.specs} == {"3"}  # the user's value, everywhere
    one = LocalSuite(SuiteConfig(data_dir=tmp_path, ports="auto", env={"EMBEDDER_MODEL_THREADS": "1"}))
    assert {s.name: s.env for s in one.specs}["models"]["EMBEDDER_MODEL_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    inherited = LocalSuite(SuiteConfig(data_dir=tmp_path, ports="auto"))
    assert all("OMP_NUM_THREADS" not in s.env for s in inherited.specs)  # children inherit the user's


def test_milvus_server_mode_runs_milvus_lite_and_stops_it_cleanly(tmp_path: Path) -> None:
    """Also when the launcher runs with SIGINT ignored, as a shell starts a background
    command (`mmsearch up &` in a script): milvus-lite inherited the ignore, never saw its
    stop signal, and was SIGKILLed after the grace period without closing its database."""
    config = SuiteConfig(data_dir=tmp_path, milvus="server", ports="auto", start_timeout_s=60)
    full = LocalSuite(config)
    milvus = full.specs[0]
    assert milvus.name == "milvus" and full.specs[-1].env["SEARCH_MILVUS_URI"] == full.milvus_uri
    assert full.milvus_uri == f"http://{milvus.address}"
    suite = LocalSuite(config, processes=[milvus], on_line=lambda *_: None)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        suite.start()
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        from pymilvus import MilvusClient

        client = MilvusClient(uri=full.milvus_uri)
        assert client.list_collections() == []
        client.close()
        pid = suite.processes[0].pid
    finally:
        started = time.monotonic()
        suite.stop()
    assert time.monotonic() - started < 15  # not the 25 s grace and a SIGKILL
    assert pid is not None and not alive(pid)
    assert "Shutting down" in (tmp_path / "logs" / "milvus.log").read_text()  # SIGINT: a clean close


def test_the_launcher_waits_on_searchs_own_ingest_health_name() -> None:
    from mmsearch.suite.launcher import INGEST_HEALTH
    from services.search.app import HEALTH_INGEST

    assert INGEST_HEALTH == HEALTH_INGEST  # the launcher cannot import the server: a copy, kept equal here
