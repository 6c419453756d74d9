"""The one process launcher: spawn a child with its env, pump its log, wait until it is
ready (gRPC health, an open port, or a probe), stop it (stop signal, then SIGKILL), kill -9 it.

`LocalSuite` (`mmsearch up`) runs its children with it; so do the tests and bench/, through
`ManagedProcess(service_spec(...))` and `ManagedProcess(milvus_spec(...))`.

Every child runs in its own session (process group), so stopping it also stops
whatever it spawned, and a Ctrl-C in the terminal reaches only the launcher, which
then stops the children in order. When the launcher is spawned from the main thread,
children also get PR_SET_PDEATHSIG (Linux): if the launcher is SIGKILLed, the kernel
terminates them, so no orphans survive even an unclean end.
"""
from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

#: Receives every output line of every child: (process name, line without newline).
LineSink = Callable[[str, str], None]
#: A custom readiness check: called with the child's address, True once it is ready.
ReadyProbe = Callable[[str], bool]

# Every child is started through this tiny exec wrapper (not a preexec_fn, which is unsafe
# with threads). It gives SIGINT back its default action: a shell starts background commands
# (`mmsearch up &` in a script) with SIGINT ignored, the ignore survives exec, and a Python
# child that inherits it never raises KeyboardInterrupt, so milvus-lite (stopped by SIGINT)
# ran until the SIGKILL after the grace period instead of closing its database.
# With a launcher pid in argv[1] (Linux, main thread) it also sets the parent-death signal,
# which survives execve.
_EXEC_WRAPPER = (
    "import os, signal, sys\n"
    "signal.signal(signal.SIGINT, signal.SIG_DFL)\n"
    "if sys.argv[1] != '0':\n"
    "    try:\n"
    "        import ctypes\n"
    "        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)\n"  # 1 = PR_SET_PDEATHSIG
    "        if os.getppid() != int(sys.argv[1]):\n"  # the launcher died before prctl
    "            sys.exit(143)\n"
    "    except Exception:\n"
    "        pass\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


class SuiteError(RuntimeError):
    """A child failed to start (or died): the message names it and quotes its last log lines."""

    def __init__(self, message: str, name: str = "", log_tail: Sequence[str] = (), log_file: Path | None = None) -> None:
        self.name = name
        self.log_tail = list(log_tail)
        self.log_file = log_file
        text = message
        if self.log_tail:
            text += f"\n--- last {len(self.log_tail)} log lines of {name} ---\n" + "\n".join(self.log_tail)
        if log_file is not None:
            text += f"\n--- full log: {log_file}"
        super().__init__(text)


@dataclass
class ProcessSpec:
    """How to run and probe one child.

    `ready`: "grpc" waits for grpc.health.v1 SERVING on `address`; "tcp" waits until the
    port accepts connections (Milvus Lite's server has no health service); a callable
    (`ReadyProbe`) is asked with `address` until it says True. `health_service`: the
    grpc.health.v1 service name "grpc" asks about ("": the whole server).
    `stop_signal`: SIGTERM for our services (they drain); SIGINT for milvus-lite, whose
    server only closes its database cleanly on KeyboardInterrupt.
    """

    name: str
    argv: list[str]
    address: str
    env: Mapping[str, str] = field(default_factory=dict)
    ready: str | ReadyProbe = "grpc"
    stop_signal: int = signal.SIGTERM
    cwd: str | None = None
    health_service: str = ""


class ManagedProcess:
    def __init__(
        self,
        spec: ProcessSpec,
        on_line: LineSink | None = None,
        log_file: Path | None = None,
        tail_lines: int = 200,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self._on_line = on_line
        self._log_file = log_file
        self._tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self._proc: subprocess.Popen[bytes] | None = None
        self._pump: threading.Thread | None = None
        self.started_at = 0.0
        self.ready_after_s: float | None = None

    # -- state

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_file(self) -> Path | None:
        return self._log_file

    def tail(self, n: int = 30) -> list[str]:
        return list(self._tail)[-n:]

    @property
    def address(self) -> str:
        return self.spec.address

    def log(self) -> str:
        """Everything the child wrote to its log file so far (across restarts); "" without one."""
        try:
            return self._log_file.read_text(errors="replace") if self._log_file is not None else ""
        except OSError:
            return ""

    # -- start

    def start(self) -> ManagedProcess:
        """Spawns the child; again after it ended, a restart with the same spec (its log is appended)."""
        if self.alive:
            raise RuntimeError(f"{self.name} is already running")
        self._drain_pump()
        if self._proc is not None and self._proc.stdout is not None:
            self._proc.stdout.close()
        env = {**os.environ, **self.spec.env, "PYTHONUNBUFFERED": "1"}
        # PDEATHSIG fires when the thread that forked ends, so only the main thread asks for it.
        pdeath = sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread()
        argv = [sys.executable, "-c", _EXEC_WRAPPER, str(os.getpid()) if pdeath else "0", *self.spec.argv]
        self.started_at = time.monotonic()
        self._proc = subprocess.Popen(
            argv,
            env=env,
            cwd=self.spec.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: signals reach its whole tree, not ours
        )
        self._pump = threading.Thread(target=self._pump_lines, name=f"suite-log-{self.name}", daemon=True)
        self._pump.start()
        return self

    def _pump_lines(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        log: IO[str] | None = None
        if self._log_file is not None:
            self._log_file.parent.mkdir(parents=True, exist_ok=True)
            log = self._log_file.open("a", encoding="utf-8")
        try:
            for raw in self._proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                self._tail.append(line)
                if log is not None:
                    log.write(line + "\n")
                    log.flush()
                if self._on_line is not None:
                    try:
                        self._on_line(self.name, line)
                    except Exception:  # noqa: BLE001, S110 - a broken sink must not stall the child's pipe
                        pass
        finally:
            if log is not None:
                log.close()

    # -- readiness

    def wait_ready(self, timeout_s: float, poll_s: float = 0.1) -> float:
        """Blocks until the child is ready, at most `timeout_s` from now; returns the seconds
        since it was started. Raises SuiteError (with its last log lines) when it exits first
        or the time runs out."""
        deadline = time.monotonic() + timeout_s
        ready = self.spec.ready
        last = "no answer yet"
        while True:
            code = self.returncode
            if code is not None:
                self._drain_pump()
                raise SuiteError(
                    f"{self.name} exited with code {code} while starting", self.name, self.tail(), self._log_file
                )
            if ready == "grpc":
                last = grpc_health(self.spec.address, self.spec.health_service)
                ok = last == "SERVING"
            elif ready == "tcp":
                ok = _tcp_open(self.spec.address)
                last = "port open" if ok else "port closed"
            else:
                assert callable(ready), f"unknown readiness check {ready!r}"
                ok = ready(self.spec.address)
                last = "ready" if ok else "not ready"
            if ok:
                self.ready_after_s = time.monotonic() - self.started_at
                return self.ready_after_s
            if time.monotonic() >= deadline:
                raise SuiteError(
                    f"{self.name} did not become ready on {self.spec.address} within {timeout_s:.0f}s "
                    f"(last health: {last})",
                    self.name,
                    self.tail(),
                    self._log_file,
                )
            time.sleep(poll_s)

    async def wait_ready_async(self, timeout_s: float, poll_s: float = 0.1) -> float:
        """`wait_ready` off the event loop (in-process servers keep serving meanwhile)."""
        return await asyncio.to_thread(self.wait_ready, timeout_s, poll_s)

    def _drain_pump(self) -> None:
        if self._pump is not None:
            self._pump.join(timeout=2.0)

    # -- stop

    def stop(self, grace_s: float = 10.0, hurry: Callable[[], bool] = lambda: False) -> int | None:
        """Stop signal to the child's process group, wait `grace_s`, then SIGKILL the group.

        `hurry()` turning true (a second Ctrl-C) cuts the grace period short.
        """
        proc = self._proc
        if proc is None:
            return None
        pgid = proc.pid  # session leader: pgid == pid
        if proc.poll() is None:
            _killpg(pgid, self.spec.stop_signal)
            deadline = time.monotonic() + grace_s
            while proc.poll() is None and time.monotonic() < deadline and not hurry():
                try:
                    proc.wait(timeout=0.1)
                except subprocess.TimeoutExpired:
                    pass
            if proc.poll() is None:
                _killpg(pgid, signal.SIGKILL)
                proc.wait(timeout=10.0)
        # The leader is gone; anything it left in its group goes too.
        _killpg(pgid, signal.SIGKILL)
        self._drain_pump()
        if proc.stdout is not None:
            proc.stdout.close()
        return proc.returncode

    def kill9(self) -> int:
        """SIGKILL to the child's process group, no grace (a crash); returns once it is reaped."""
        proc = self._proc
        assert proc is not None, f"{self.name} was never started"
        _killpg(proc.pid, signal.SIGKILL)
        code = proc.wait(timeout=10.0)
        self._drain_pump()
        return code

    def send_signal(self, sig: int) -> None:
        """One signal to the child itself (not its group), as a kubelet sends SIGTERM to PID 1."""
        assert self._proc is not None, f"{self.name} was never started"
        self._proc.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        """Waits for the child to exit; its exit code (subprocess.TimeoutExpired after `timeout_s`)."""
        assert self._proc is not None, f"{self.name} was never started"
        code = self._proc.wait(timeout=timeout_s)
        self._drain_pump()
        return code


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def service_spec(
    service: str,
    port: int,
    env: Mapping[str, str] | None = None,
    *,
    host: str = "127.0.0.1",
    metrics_port: int = -1,
    name: str | None = None,
    python: str = sys.executable,
    cwd: str | None = None,
    ready: str | ReadyProbe = "grpc",
) -> ProcessSpec:
    """`python -m services.<service>` listening on host:port: `env` plus its
    `<SERVICE>_HOST`, `_GRPC_PORT` and `_METRICS_PORT` (-1: no /metrics), which win."""
    prefix = service.upper() + "_"
    return ProcessSpec(
        name=name or service,
        argv=[python, "-m", f"services.{service}"],
        address=f"{host}:{port}",
        env={**(env or {}), f"{prefix}HOST": host, f"{prefix}GRPC_PORT": str(port),
             f"{prefix}METRICS_PORT": str(metrics_port)},
        ready=ready,
        cwd=cwd,
    )


def milvus_spec(data_dir: Path, port: int, *, host: str = "127.0.0.1", python: str = sys.executable) -> ProcessSpec:
    """A `milvus-lite server` (gRPC, like a Milvus cluster) on host:port keeping its data in `data_dir`."""
    return ProcessSpec(
        name="milvus",
        argv=[python, "-m", "milvus_lite", "server", "--data-dir", str(data_dir), "--host", host, "--port", str(port)],
        address=f"{host}:{port}",
        ready="tcp",
        stop_signal=signal.SIGINT,  # milvus-lite closes its database on KeyboardInterrupt
    )


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def grpc_health(address: str, service: str = "") -> str:
    """The serving status name of `service` at `address` (or the gRPC status code name)."""
    # A fresh channel per check: a kept one would back off (1 s, 1.6 s, ...) between the
    # connection attempts that fail while the child starts, and see it ready late.
    with grpc.insecure_channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
        except grpc.RpcError as e:
            return e.code().name  # type: ignore[attr-defined]
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def _tcp_open(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=0.5):
            return True
    except OSError:
        return False


def format_log_line(line: str) -> tuple[str, str]:
    """A service's JSON log line as (level, readable text); other lines as ("", line)."""
    if not line.startswith("{"):
        return "", line
    try:
        record = json.loads(line)
    except ValueError:
        return "", line
    if not isinstance(record, dict):
        return "", line
    level = str(record.pop("level", ""))
    event = str(record.pop("event", ""))
    for noise in ("timestamp", "logger", "service"):
        record.pop(noise, None)
    exc = record.pop("exception", None)
    extras = " ".join(f"{k}={v}" for k, v in record.items())
    text = f"{event} {extras}".strip()
    if exc:
        text += "\n" + str(exc)
    return level, text
