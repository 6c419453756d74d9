"""Shared helpers for the bench scripts: tables, percentiles, sample images, and the suite
(embedder, captioner, search, optionally a Milvus Lite server) started as real processes.

Benchmarks on a shared, noisy machine report ratios and curves measured in one run
against a baseline in the same run; these helpers keep every script doing that the same
way. Nothing here asserts anything about time.
"""
from __future__ import annotations

import asyncio
import datetime as _dt
import io
import math
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np

# --- statistics and tables -----------------------------------------------------------------


def pct(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100, linear interpolation); NaN for no values."""
    if not len(values):
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=np.float64), p))


def summary_ms(values_s: Sequence[float]) -> dict[str, float]:
    """p50 / p90 / p99 / mean in milliseconds of durations given in seconds."""
    ms = [v * 1000 for v in values_s]
    return {"p50": pct(ms, 50), "p90": pct(ms, 90), "p99": pct(ms, 99),
            "mean": float(np.mean(ms)) if ms else float("nan"), "n": float(len(ms))}


def fmt(value: Any, digits: int = 2) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], digits: int = 2) -> str:
    """A GitHub-markdown table (so output pastes straight into docs/benchmarks.md)."""
    cells = [[fmt(c, digits) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
    out = [line(list(headers)), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out)


def print_table(title: str, headers: Sequence[str], rows: Iterable[Sequence[Any]], digits: int = 2) -> None:
    print(f"\n### {title}\n")
    print(table(headers, rows, digits))
    sys.stdout.flush()


def machine() -> str:
    """One line saying where and when a benchmark ran."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = ", load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        load = ""
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except (ImportError, RuntimeError):  # no torch, or a broken CUDA set-up: say "no GPU"
        pass
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"{now}; {os.cpu_count()} vCPU ({cpu}){load}; {gpu}; python {platform.python_version()}"


def header(title: str, argv: Sequence[str] | None = None) -> None:
    print(f"## {title}")
    print(f"command: python {' '.join(argv if argv is not None else sys.argv)}")
    print(f"machine: {machine()}")
    sys.stdout.flush()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    """Resident set size of one process in MiB (psutil, else /proc)."""
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# --- images --------------------------------------------------------------------------------


def sample_jpegs(n: int | None = None, max_side: int | None = None, seed: int = 0, quality: int = 90) -> list[bytes]:
    """The real sample photos as JPEG; with `n`, replicated with small perturbations
    (a crop of a few pixels, brightness +-3 %, mirrored on odd rounds) so every image has
    distinct bytes and therefore a distinct content-hash id. Different seeds give
    disjoint sets (seed 0 starts with the unmodified photos)."""
    from PIL import ImageEnhance, ImageOps

    from services.lite_models.sample_photos import load_sample_photos

    bases = []
    for photo in load_sample_photos():
        img = photo.image.convert("RGB")
        if max_side and max(img.size) > max_side:
            img.thumbnail((max_side, max_side))
        bases.append(img)
    if n is None:
        n = len(bases)
    rng = random.Random(seed)
    out: list[bytes] = []
    for i in range(n):
        img = bases[i % len(bases)]
        rnd = i // len(bases)
        if rnd or seed:  # seed 0 keeps the originals first; other seeds perturb everything
            w, h = img.size
            dx, dy = rng.randint(0, 6), rng.randint(0, 6)
            img = img.crop((dx, dy, w - rng.randint(0, 6), h - rng.randint(0, 6)))
            img = ImageEnhance.Brightness(img).enhance(1 + rng.uniform(-0.03, 0.03))
            if rnd % 2:
                img = ImageOps.mirror(img)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def release_embedded_milvus(uri: str) -> None:
    """Stops the Milvus Lite server pymilvus embedded in this process for `uri` (so its
    directory can be removed without Milvus Lite writing it again at exit)."""
    try:
        from milvus_lite.server_manager import server_manager_instance
    except ImportError:
        return
    server_manager_instance.release_server(uri)


def unit_vectors(n: int, dim: int, seed: int = 0, clusters: int = 0) -> np.ndarray:
    """Synthetic L2-normalised float32 vectors. With `clusters`, points scatter around
    that many random centres (closer to real embeddings than uniform noise, and harder
    for IVF partitions)."""
    rng = np.random.default_rng(seed)
    if clusters:
        centres = rng.standard_normal((clusters, dim), dtype=np.float32)
        v = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, dim), dtype=np.float32)
    else:
        v = rng.standard_normal((n, dim), dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


# --- processes -----------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def spawn(name: str, args: list[str], env: dict[str, str], port: int, workdir: Path) -> Proc:
    log_path = workdir / f"{name}.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    popen = subprocess.Popen(args, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    return Proc(name, popen, port, log_path)


async def closed_loop(call: Callable[[int], Awaitable[Any]], clients: int, stop_at: float) -> None:
    """`clients` closed-loop callers until `time.perf_counter()` passes `stop_at`: caller c
    makes call(c), call(c + clients), call(c + 2 * clients), ..., each as soon as the last
    one returned. `call` gets the running request number (to pick a request) and counts
    what it needs itself."""

    async def caller(c: int) -> None:
        i = c
        while time.perf_counter() < stop_at:
            await call(i)
            i += clients

    await asyncio.gather(*(caller(c) for c in range(clients)))


async def _poll(proc: Proc, ready: Callable[[], Awaitable[bool]], timeout_s: float, what: str,
                every_s: float = 0.3) -> None:
    """Calls `ready` until it says True; fails early when the process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        if await ready():
            return
        await asyncio.sleep(every_s)
    raise TimeoutError(f"{proc.name} did not {what}:\n{proc.tail()}")


async def wait_serving(proc: Proc, timeout_s: float = 300) -> None:
    """Polls grpc.health.v1 until SERVING (or the process dies)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(proc.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        async def serving() -> bool:
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
            except grpc.aio.AioRpcError:
                return False
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

        await _poll(proc, serving, timeout_s, "become SERVING")


async def wait_port(port: int, proc: Proc, timeout_s: float = 120) -> None:
    async def listening() -> bool:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return False
        writer.close()
        return True

    await _poll(proc, listening, timeout_s, f"open port {port}", every_s=0.2)


def milvus_lite_bin() -> str:
    exe = Path(sys.executable).with_name("milvus-lite")
    return str(exe) if exe.exists() else (shutil.which("milvus-lite") or "milvus-lite")


@dataclass
class Suite:
    """embedder + captioner + search as separate processes, as deployed, with Milvus
    either embedded in the search process (`milvus="embedded"`, a Milvus Lite file) or a
    Milvus Lite server in its own process (`milvus="server"`)."""

    milvus: str = "embedded"
    search_env: dict[str, str] = field(default_factory=dict)
    embedder_env: dict[str, str] = field(default_factory=dict)
    captioner_env: dict[str, str] = field(default_factory=dict)
    with_captioner: bool = True
    search_metrics: bool = False  # serve the search process' /metrics (see scrape_metrics)
    workdir: Path = field(default_factory=Path)  # a fresh temporary directory, made by start()
    procs: dict[str, Proc] = field(default_factory=dict)
    milvus_uri: str = ""
    metrics_port: int = -1

    async def start(self) -> Suite:
        """Spawns every process at once (the search service waits for the embedder by
        itself), then waits until all of them answer health checks."""
        if self.workdir == Path():
            self.workdir = Path(tempfile.mkdtemp(prefix="mmsearch-bench-"))
        py = sys.executable
        quiet = {"LOG_LEVEL": "WARNING"}
        emb_port, cap_port, search_port = free_port(), free_port(), free_port()
        self.procs["embedder"] = spawn("embedder", [py, "-m", "services.embedder"], {
            "EMBEDDER_HOST": "127.0.0.1", "EMBEDDER_GRPC_PORT": str(emb_port), "EMBEDDER_METRICS_PORT": "-1",
            **{f"EMBEDDER_{k}": v for k, v in quiet.items()}, **self.embedder_env}, emb_port, self.workdir)
        if self.with_captioner:
            self.procs["captioner"] = spawn("captioner", [py, "-m", "services.captioner"], {
                "CAPTIONER_HOST": "127.0.0.1", "CAPTIONER_GRPC_PORT": str(cap_port), "CAPTIONER_METRICS_PORT": "-1",
                **{f"CAPTIONER_{k}": v for k, v in quiet.items()}, **self.captioner_env}, cap_port, self.workdir)
        if self.milvus == "server":
            mport = free_port()
            data = self.workdir / "milvus-data"
            self.procs["milvus"] = spawn("milvus", [milvus_lite_bin(), "server", "--data-dir", str(data), "--port",
                                                     str(mport), "--host", "127.0.0.1"], {}, mport, self.workdir)
            await wait_port(mport, self.procs["milvus"])
            self.milvus_uri = f"http://127.0.0.1:{mport}"
        else:
            self.milvus_uri = str(self.workdir / "milvus.db")
        self.metrics_port = free_port() if self.search_metrics else -1
        self.procs["search"] = spawn("search", [py, "-m", "services.search"], {
            "SEARCH_HOST": "127.0.0.1", "SEARCH_GRPC_PORT": str(search_port),
            "SEARCH_METRICS_PORT": str(self.metrics_port),
            "SEARCH_LOG_LEVEL": "WARNING", "SEARCH_MILVUS_URI": self.milvus_uri,
            "SEARCH_EMBEDDER_TARGET": self.procs["embedder"].address,
            # With no captioner the search service still needs a target; nothing calls it
            # when every ingested item carries its own caption.
            "SEARCH_CAPTIONER_TARGET": f"127.0.0.1:{cap_port}",
            **self.search_env}, search_port, self.workdir)
        waits = [wait_serving(self.procs["embedder"])]
        if self.with_captioner:
            waits += [wait_serving(self.procs["captioner"]), wait_serving(self.procs["search"])]
        await asyncio.gather(*waits)
        if not self.with_captioner:  # health stays NOT_SERVING without a captioner: wait for start-up
            await wait_started(self.procs["search"])
        return self

    async def restart_search(self, env: dict[str, str]) -> Proc:
        """Replaces the search process by one with these extra SEARCH_* settings (same
        Milvus data, same upstreams): A/B runs of a setting within one benchmark run."""
        old = self.procs["search"]
        old.stop()
        port = free_port()
        self.search_env = {**self.search_env, **env}
        cap = self.procs["captioner"].address if "captioner" in self.procs else f"127.0.0.1:{free_port()}"
        self.procs["search"] = spawn(f"search-{port}", [sys.executable, "-m", "services.search"], {
            "SEARCH_HOST": "127.0.0.1", "SEARCH_GRPC_PORT": str(port), "SEARCH_METRICS_PORT": str(self.metrics_port),
            "SEARCH_LOG_LEVEL": "WARNING", "SEARCH_MILVUS_URI": self.milvus_uri,
            "SEARCH_EMBEDDER_TARGET": self.procs["embedder"].address, "SEARCH_CAPTIONER_TARGET": cap,
            **self.search_env}, port, self.workdir)
        if "captioner" in self.procs:
            await wait_serving(self.procs["search"])
        else:
            await wait_started(self.procs["search"])
        return self.procs["search"]

    @property
    def search(self) -> Proc:
        return self.procs["search"]

    def stop(self) -> None:
        for name in ("search", "captioner", "embedder", "milvus"):
            if name in self.procs:
                self.procs[name].stop()

    def cleanup(self) -> None:
        self.stop()
        if self.workdir != Path():
            shutil.rmtree(self.workdir, ignore_errors=True)

    async def __aenter__(self) -> Suite:  # noqa: PYI034 - may hand out the shared suite, not self
        if _SHARED is not None:  # CI smoke runs: one suite for every benchmark
            return _SHARED
        try:
            return await self.start()
        except BaseException:
            self.cleanup()
            raise

    async def __aexit__(self, *exc: object) -> None:
        if _SHARED is None:
            self.cleanup()


_SHARED: Suite | None = None


def share(suite: Suite | None) -> None:
    """Makes every `async with Suite(...)` hand out this already running suite (and leave
    it running) whatever options it asked for: for smoke runs, which check that the
    benchmarks work, not what they measure."""
    global _SHARED
    _SHARED = suite


def shared() -> Suite | None:
    return _SHARED


async def wait_started(proc: Proc, timeout_s: float = 300) -> None:
    """Waits until the search service answers a call (its start-up hook has run), for
    runs where its health stays NOT_SERVING on purpose."""
    import grpc

    from mmsearch.search.v1 import search_pb2, search_pb2_grpc

    async with grpc.aio.insecure_channel(proc.address) as channel:
        stub = search_pb2_grpc.SearchStub(channel)

        async def answers() -> bool:
            try:
                await stub.Stats(search_pb2.StatsRequest(), timeout=10)
            except grpc.aio.AioRpcError:
                return False
            return True

        await _poll(proc, answers, timeout_s, "start")


def scrape_metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus samples of a service: (name, sorted labels) -> value."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process so far."""
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


class FakeVisionLLM:
    """A local OpenAI-compatible chat-completions endpoint that answers every caption
    request after a fixed delay, using no CPU: a stand-in for a remote Qwen-VL (vLLM on a
    GPU node, or DashScope) so the captioner is I/O-bound, as in production.

    Point the captioner at it with `env()` (CAPTIONER_BACKEND=openai)."""

    def __init__(self, delay_s: float) -> None:
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        fake = self
        self.delay_s = delay_s
        self.requests = 0

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # http.server's naming
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                fake.requests += 1
                time.sleep(fake.delay_s)
                body = json.dumps({
                    "id": f"chatcmpl-{fake.requests}", "object": "chat.completion", "created": int(time.time()),
                    "model": "bench-vl",
                    "choices": [{"index": 0, "finish_reason": "stop", "message": {
                        "role": "assistant",
                        "content": f"A photo used by the ingest benchmark, take {fake.requests}.\n\n"
                                   "Keywords: photo, benchmark, sample, test, image"}}],
                    "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
                }).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def env(self) -> dict[str, str]:
        return {"CAPTIONER_BACKEND": "openai", "CAPTIONER_API_KEY": "bench",
                "CAPTIONER_BASE_URL": f"http://127.0.0.1:{self.server.server_port}/v1"}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- gRPC client helpers ---------------------------------------------------------------------

CLIENT_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


def ingest_requests(jpegs: Sequence[bytes], chunk: int = 8, captions: Sequence[str] | None = None,
                    ids: Sequence[str] | None = None) -> list[Any]:
    from mmsearch.common.v1 import types_pb2
    from mmsearch.search.v1 import search_pb2

    items = []
    for i, data in enumerate(jpegs):
        kw: dict[str, Any] = {"image": types_pb2.Image(data=data)}
        if captions is not None:
            kw["caption"] = search_pb2.CaptionInput(description=captions[i % len(captions)], keywords=["bench"])
        if ids is not None:
            kw["id"] = ids[i]
        items.append(search_pb2.IngestItem(**kw))
    return [search_pb2.IngestRequest(items=items[i : i + chunk]) for i in range(0, len(items), chunk)]


async def ingest_all(stub: Any, requests: Sequence[Any], timeout_s: float = 600) -> dict[str, int]:
    """Streams the requests through Search.Ingest; returns the final progress counts."""
    from mmsearch.search.v1 import search_pb2

    counts = {"stored": 0, "unchanged": 0, "failed": 0}
    errors: list[str] = []
    async for reply in stub.Ingest(iter(requests), timeout=timeout_s):
        for o in reply.outcomes:
            if o.status == search_pb2.ITEM_STATUS_FAILED and len(errors) < 3:
                errors.append(o.error.message)
        p = reply.progress
        counts = {"stored": p.stored, "unchanged": p.unchanged, "failed": p.failed}
    if errors:
        print(f"  (ingest failures, first few: {errors})")
    return counts


async def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = await fn()
    return time.perf_counter() - start, result
