"""The local suite: Milvus (optional), embedder, captioner and search as child processes
(with both lite backends, the default, one "models" process serves the embedder and the
captioner: services/models).

`LocalSuite` starts them in dependency order on loopback ports, each one only after
the previous one reports SERVING, and stops them in reverse order. It is what
`mmsearch up` and `mmsearch demo` run, and what end-to-end tests use::

    with LocalSuite(SuiteConfig(data_dir=tmp, ports="auto")) as suite:
        client = SearchClient(suite.search_address)
"""
from __future__ import annotations

import atexit
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Self

from mmsearch.suite.process import (
    LineSink,
    ManagedProcess,
    ProcessSpec,
    SuiteError,
    free_port,
    grpc_health,
    milvus_spec,
    service_spec,
)

#: Search's health name for "ingest works" (services/search/app.py HEALTH_INGEST; the
#: client side must not import the servers).
INGEST_HEALTH = "ingest"

#: Called when a child is ready: (name, address, seconds it took).
ReadySink = Callable[[str, str, float], None]

DEFAULT_PORTS = {"search": 50050, "embedder": 50051, "captioner": 50052, "milvus": 19530, "gateway": 8080}
DEFAULT_METRICS_PORTS = {"search": 9100, "embedder": 9101, "captioner": 9102, "gateway": 9103}


@dataclass
class SuiteConfig:
    """What to start and where.

    `milvus`: "embedded" (the search service opens a Milvus Lite file under `data_dir`),
    "server" (start `milvus-lite server` on a loopback port), or "external" with
    `milvus_uri` (an existing Milvus, e.g. http://127.0.0.1:19530).
    `ports`: "default" (50050-50052, metrics 9100-9102, Milvus 19530) or "auto" (free
    ports picked now; metrics on free ports too): tests and the demo use "auto".
    Backends are left to the services' own settings (lite by default) unless given here.
    """

    data_dir: Path = Path("var")
    host: str = "127.0.0.1"
    ports: Literal["default", "auto"] = "default"
    search_port: int | None = None
    embedder_port: int | None = None
    captioner_port: int | None = None
    # The HTTP/JSON gateway and search page (services/gateway) after search; `mmsearch up`
    # turns it on. Its thumbnails read `file_root` like search does.
    gateway: bool = False
    gateway_port: int | None = None
    metrics: bool = True
    milvus: Literal["embedded", "server", "external"] = "embedded"
    milvus_uri: str | None = None
    milvus_port: int | None = None
    embedder_backend: str | None = None
    captioner_backend: str | None = None
    # One "models" process (services/models) serving both the Embedder and the Captioner
    # on the embedder's port, instead of the two: None (default) when both backends are
    # lite (this config, else `env`, else the environment, else their default, lite).
    models_process: bool | None = None
    file_root: Path | None = None
    log_level: str | None = None
    start_timeout_s: float = 300.0
    stop_grace_s: float = 25.0  # above the services' own 20 s drain
    python: str = sys.executable
    env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.milvus == "external" and not self.milvus_uri:
            raise ValueError('milvus="external" needs milvus_uri')
        if self.milvus_uri and self.milvus != "external":
            self.milvus = "external"


class LocalSuite:
    """Starts and stops the suite. A context manager; also stops at interpreter exit.

    `processes` (advanced, for tests): run these specs instead of the real services.
    `on_line` receives every child log line (default: prefixed lines on stderr);
    every child's log is also written to `<data_dir>/logs/<name>.log`.
    """

    def __init__(
        self,
        config: SuiteConfig | None = None,
        *,
        on_line: LineSink | None = None,
        on_ready: ReadySink | None = None,
        processes: Sequence[ProcessSpec] | None = None,
    ) -> None:
        self.config = config or SuiteConfig()
        self.data_dir = Path(self.config.data_dir).expanduser().resolve()
        self._on_line = on_line if on_line is not None else _stderr_sink
        self._on_ready = on_ready
        self._ports = self._pick_ports()
        self.specs = list(processes) if processes is not None else self._service_specs()
        self.processes: list[ManagedProcess] = []
        self._atexit_registered = False
        self._reported_dead: set[str] = set()

    # -- addresses

    def _pick_ports(self) -> dict[str, int]:
        c = self.config
        auto = c.ports == "auto"
        ports: dict[str, int] = {}
        for name, given in (
            ("search", c.search_port),
            ("embedder", c.embedder_port),
            ("captioner", c.captioner_port),
            ("milvus", c.milvus_port),
            ("gateway", c.gateway_port),
        ):
            ports[name] = given if given else (free_port(c.host) if auto else DEFAULT_PORTS[name])
        for name, port in DEFAULT_METRICS_PORTS.items():
            ports[f"{name}_metrics"] = (0 if auto else port) if c.metrics else -1
        if self.combined_models:  # the models process takes the embedder's ports; both targets point at it
            ports["models"] = ports["captioner"] = ports["embedder"]
            ports["models_metrics"] = ports["embedder_metrics"]
        return ports

    @property
    def combined_models(self) -> bool:
        """Whether one models process serves both the Embedder and the Captioner."""
        c = self.config
        if c.models_process is not None:
            return c.models_process

        def backend(name: str, given: str | None) -> str:
            key = f"{name.upper()}_BACKEND"
            return given or c.env.get(key) or os.environ.get(key) or "lite"

        return backend("embedder", c.embedder_backend) == "lite" and backend("captioner", c.captioner_backend) == "lite"

    def address(self, name: str) -> str:
        return f"{self.config.host}:{self._ports[name]}"

    @property
    def search_address(self) -> str:
        return self.address("search")

    @property
    def embedder_address(self) -> str:
        return self.address("embedder")

    @property
    def captioner_address(self) -> str:
        return self.address("captioner")

    @property
    def gateway_url(self) -> str | None:
        """The search page and HTTP/JSON API, when the suite runs the gateway."""
        return f"http://{self.address('gateway')}/" if self.config.gateway else None

    @property
    def milvus_uri(self) -> str:
        c = self.config
        if c.milvus == "external":
            assert c.milvus_uri
            return c.milvus_uri
        if c.milvus == "server":
            return f"http://{self.address('milvus')}"
        return str(self.data_dir / "mmsearch.db")

    # -- specs

    def _service_spec(self, name: str, env: Mapping[str, str]) -> ProcessSpec:
        c = self.config
        prefix = name.upper() + "_"
        env = {
            "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
            "TRANSFORMERS_OFFLINE": os.environ.get("TRANSFORMERS_OFFLINE", "1"),
            **c.env,
            **env,
            f"{prefix}LOG_JSON": "true",
        }
        if c.log_level:
            env[f"{prefix}LOG_LEVEL"] = c.log_level
        return service_spec(name, self._ports[name], env, host=c.host, metrics_port=self._ports[f"{name}_metrics"],
                            python=c.python)

    def _user_set(self, key: str) -> bool:
        """Whether the user chose `key` (environment or `SuiteConfig.env`): their value wins
        over the launcher's default, which would otherwise override what children inherit."""
        return key in os.environ or key in self.config.env

    def _model_threads_env(self) -> dict[str, str]:
        """The embedder and the captioner both run model forwards on this one machine: give
        each half the cores (torch's threads, and the lite runtime's, which follows them).
        torch's default (every core, in both processes) makes their OpenMP threads
        spin-wait for each other: on 2 cores ingest cost 4.4x the CPU per item and ran
        ~5.8x slower (docs/benchmarks.md, "Ingest pipelining"). An OMP_NUM_THREADS set by
        the user wins."""
        if self._user_set("OMP_NUM_THREADS"):
            return {}
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
        return {"OMP_NUM_THREADS": str(max(1, cores // 2))}

    def _service_specs(self) -> list[ProcessSpec]:
        c = self.config
        specs: list[ProcessSpec] = []
        if c.milvus == "server":
            specs.append(milvus_spec(self.data_dir / "milvus-server", self._ports["milvus"], host=c.host,
                                     python=c.python))
        embedder_env = self._model_threads_env()
        if c.embedder_backend:
            embedder_env["EMBEDDER_BACKEND"] = c.embedder_backend
        captioner_env = self._model_threads_env()
        if c.captioner_backend:
            captioner_env["CAPTIONER_BACKEND"] = c.captioner_backend
        search_env = {
            "SEARCH_MILVUS_URI": self.milvus_uri,
            "SEARCH_EMBEDDER_TARGET": self.embedder_address,
            "SEARCH_CAPTIONER_TARGET": self.captioner_address,
            # Deferred items' images for `mmsearch backfill` (used with SEARCH_ON_CAPTION_FAILURE=defer).
            "SEARCH_PENDING_IMAGES_DIR": str(self.data_dir / "pending-images"),
            **{k: v for k, v in c.env.items() if k == "SEARCH_PENDING_IMAGES_DIR"},
        }
        if c.file_root is not None:
            search_env["SEARCH_URIS__FILE_ROOT"] = str(Path(c.file_root).expanduser().resolve())
        if self.combined_models:
            # One models process: two forwards at once, each on half the cores (the caption's
            # classifier and the embedder's text model both run there). One forward spread over
            # every core waits for the cores the decode workers hold (~13 % more CPU per item
            # on 2 cores); one forward at a time on half of them left the other half idle
            # (0.74x the single-process peer's items/s). bench/ingest_peer.py measures both.
            models_env = {**embedder_env, **captioner_env}
            if not self._user_set("EMBEDDER_MODEL_THREADS"):
                models_env["EMBEDDER_MODEL_THREADS"] = "2"
            specs.append(self._service_spec("models", models_env))
        else:
            specs += [
                self._service_spec("embedder", embedder_env),
                self._service_spec("captioner", captioner_env),
            ]
        specs.append(self._service_spec("search", search_env))
        if c.gateway:
            gateway_env = {
                **c.env,
                "GATEWAY_HOST": c.host,
                "GATEWAY_HTTP_PORT": str(self._ports["gateway"]),
                "GATEWAY_METRICS_PORT": str(self._ports["gateway_metrics"]),
                "GATEWAY_LOG_JSON": "true",
                "GATEWAY_SEARCH_TARGET": self.search_address,
            }
            if c.log_level:
                gateway_env["GATEWAY_LOG_LEVEL"] = c.log_level
            if c.file_root is not None:
                gateway_env["GATEWAY_FILE_ROOT"] = str(Path(c.file_root).expanduser().resolve())
            specs.append(ProcessSpec("gateway", [c.python, "-m", "services.gateway"], self.address("gateway"),
                                     gateway_env, ready="tcp"))
        return specs

    # -- lifecycle

    def start(self) -> LocalSuite:
        """Starts every child at once, then waits until each is ready (in order).

        At once, because no child needs another to start: search answers before Milvus
        or its upstreams do and binds the embedder when it comes. Started one after the
        other, the suite's cold start was the sum of the children's (the models process
        loading while search waited its turn). Ready still means what it meant: after
        search is SERVING, up to `embedder_start_wait_s` (5 s) more for it to have bound
        the embedder, so a caller that ingests right after start finds ingest ready.

        On any failure everything already started is stopped and `SuiteError` is raised
        with the failing child's last log lines.
        """
        if self.processes:
            raise RuntimeError("suite already started")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._refuse_second_suite()
        if not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True
        try:
            for spec in self.specs:
                proc = ManagedProcess(spec, self._on_line, log_file=self.data_dir / "logs" / f"{spec.name}.log")
                self.processes.append(proc)
                proc.start()
            self._write_state()
            for proc in self.processes:
                took = proc.wait_ready(self.config.start_timeout_s)
                if self._on_ready is not None:
                    self._on_ready(proc.name, proc.spec.address, took)
            self._wait_ingest_bound()
        except BaseException:
            self.stop()
            raise
        self._write_state()
        return self

    def _wait_ingest_bound(self, wait_s: float = 5.0) -> None:
        """Search is SERVING once Milvus answers; give it a moment to bind the embedder that
        started beside it. One that cannot bind (e.g. a model guard refusal) leaves the
        suite up and degraded, as search itself does after its own 5 s wait."""
        search = next((p for p in self.processes if p.name == "search"), None)
        if search is None:
            return
        deadline = time.monotonic() + wait_s
        while grpc_health(search.spec.address, INGEST_HEALTH) != "SERVING" and time.monotonic() < deadline:
            if search.returncode is not None:
                return  # the watcher reports it
            time.sleep(0.1)

    def _refuse_second_suite(self) -> None:
        """Two suites on one data dir would fight over the Milvus Lite files: say so early."""
        try:
            state = json.loads(self.state_file.read_text())
            pid = int(state["launcher_pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        if pid == os.getpid():
            return
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return  # stale file from a launcher that was killed
        except PermissionError:
            pass
        raise SuiteError(
            f"a suite is already running on {self.data_dir} (launcher pid {pid}, search at "
            f"{state.get('search_address', '?')}); stop it or use another --data-dir"
        )

    def check(self) -> None:
        """Raises SuiteError when a child died after start-up (used by `mmsearch up`)."""
        for proc in self.processes:
            code = proc.returncode
            if code is not None:
                raise SuiteError(
                    f"{proc.name} exited unexpectedly with code {code}", proc.name, proc.tail(), proc.log_file
                )

    def newly_dead(self) -> list[SuiteError]:
        """Children that died since the last call, each reported once (`--keep-going`)."""
        found = []
        for proc in self.processes:
            code = proc.returncode
            if code is not None and proc.name not in self._reported_dead:
                self._reported_dead.add(proc.name)
                found.append(SuiteError(
                    f"{proc.name} exited unexpectedly with code {code}", proc.name, proc.tail(), proc.log_file
                ))
        if found:
            self._write_state()
        return found

    @property
    def alive(self) -> list[str]:
        return [p.name for p in self.processes if p.alive]

    def stop(self) -> None:
        """Stops children in reverse start order (search first, Milvus last). Idempotent."""
        if not self.processes:
            self._cleanup()
            return
        hurry = {"now": False}
        restore = _signals_cut_grace_short(hurry)
        try:
            for proc in reversed(list(self.processes)):
                proc.stop(self.config.stop_grace_s, hurry=lambda: hurry["now"])
                self.processes.remove(proc)
        finally:
            restore()
        self._cleanup()

    def _cleanup(self) -> None:
        state = self.state_file
        if state.exists():
            state.unlink(missing_ok=True)
        if self._atexit_registered:
            atexit.unregister(self.stop)
            self._atexit_registered = False

    @property
    def state_file(self) -> Path:
        return self.data_dir / "suite.json"

    def _write_state(self) -> None:
        """`<data_dir>/suite.json`: addresses and pids of the running children (for tools and tests)."""
        state = {
            "launcher_pid": os.getpid(),
            "search_address": self.search_address,
            "gateway_url": self.gateway_url,
            "milvus_uri": self.milvus_uri,
            "processes": [
                {"name": p.name, "pid": p.pid, "address": p.spec.address, "ready": p.ready_after_s is not None,
                 "alive": p.alive}
                for p in self.processes
            ],
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_file)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signals_cut_grace_short(hurry: dict[str, bool]) -> Callable[[], None]:
    """While stopping, another SIGINT / SIGTERM skips the grace period instead of
    interrupting the shutdown half-way (which would leave children running)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: object) -> None:
        hurry["now"] = True

    return _on_stop_signals(handler)


def _on_stop_signals(handler: Callable[[int, object], None]) -> Callable[[], None]:
    """Installs `handler` for SIGINT and SIGTERM; returns a function restoring the previous ones."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, handler)  # type: ignore[arg-type]

    def restore() -> None:
        for sig, h in previous.items():
            signal.signal(sig, h)

    return restore


def _stderr_sink(name: str, line: str) -> None:
    sys.stderr.write(f"[{name}] {line}\n")


def wait_forever(
    suite: LocalSuite, poll_s: float = 1.0, *, keep_going: bool = False,
    on_death: Callable[[SuiteError], None] | None = None,
) -> None:
    """Blocks until SIGINT / SIGTERM (as KeyboardInterrupt) or a child dies (SuiteError).

    With `keep_going`, a child's death is handed to `on_death` (once per child) and the
    others keep serving: the search service degrades without its embedder or captioner
    (docs/operations.md). Only when no child is left does it raise SuiteError.
    """
    while True:
        if not keep_going:
            suite.check()
        else:
            for death in suite.newly_dead():
                if on_death is not None:
                    on_death(death)
            if not suite.alive:
                raise SuiteError("every service has exited")
        time.sleep(poll_s)


def install_interrupt_handlers() -> Callable[[], None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt in the main thread, so `with LocalSuite()` unwinds.

    SIGINT is set explicitly too: a shell starts background jobs with SIGINT ignored, and
    Python then never turns Ctrl-C into KeyboardInterrupt. Returns a function restoring
    the previous handlers.
    """

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    return _on_stop_signals(handler)
