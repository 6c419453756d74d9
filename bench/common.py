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

from mmsearch.suite import ManagedProcess, ProcessSpec, free_port, milvus_spec, service_spec

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


def start_process(spec: ProcessSpec, workdir: Path) -> ManagedProcess:
    """The launcher's process for `spec`, its output in `<workdir>/<name>.log`; wait for it
    with `await proc.wait_ready_async(timeout_s)`, end it with `proc.stop()`."""
    return ManagedProcess(spec, log_file=workdir / f"{spec.name}.log").start()


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
    procs: dict[str, ManagedProcess] = field(default_factory=dict)
    milvus_uri: str = ""
    metrics_port: int = -1
    _captioner_port: int = 0

    async def start(self) -> Suite:
        """Spawns every process at once (the search service waits for the embedder by
        itself), then waits until all of them answer health checks."""
        if self.workdir == Path():
            self.workdir = Path(tempfile.mkdtemp(prefix="mmsearch-bench-"))
        emb_port, self._captioner_port = free_port(), free_port()
        self.procs["embedder"] = start_process(service_spec(
            "embedder", emb_port, {"EMBEDDER_LOG_LEVEL": "WARNING", **self.embedder_env}), self.workdir)
        if self.with_captioner:
            self.procs["captioner"] = start_process(service_spec(
                "captioner", self._captioner_port, {"CAPTIONER_LOG_LEVEL": "WARNING", **self.captioner_env}),
                self.workdir)
        if self.milvus == "server":
            milvus = start_process(milvus_spec(self.workdir / "milvus-data", free_port()), self.workdir)
            self.procs["milvus"] = milvus
            await milvus.wait_ready_async(120)
            self.milvus_uri = f"http://{milvus.address}"
        else:
            self.milvus_uri = str(self.workdir / "milvus.db")
        self.metrics_port = free_port() if self.search_metrics else -1
        self.procs["search"] = self._start_search("search", free_port())
        for proc in self.procs.values():
            await proc.wait_ready_async(300)
        return self

    def _start_search(self, name: str, port: int) -> ManagedProcess:
        # With no captioner the search service still needs a target; nothing calls it when
        # every ingested item carries its own caption. Its health then stays NOT_SERVING on
        # purpose: it is ready once it answers a call (its start-up hook has run).
        return start_process(service_spec("search", port, {
            "SEARCH_LOG_LEVEL": "WARNING", "SEARCH_MILVUS_URI": self.milvus_uri,
            "SEARCH_EMBEDDER_TARGET": self.procs["embedder"].address,
            "SEARCH_CAPTIONER_TARGET": f"127.0.0.1:{self._captioner_port}", **self.search_env},
            metrics_port=self.metrics_port, name=name, ready="grpc" if self.with_captioner else search_answers),
            self.workdir)

    async def restart_search(self, env: dict[str, str]) -> ManagedProcess:
        """Replaces the search process by one with these extra SEARCH_* settings (same
        Milvus data, same upstreams): A/B runs of a setting within one benchmark run."""
        self.procs["search"].stop(30)
        self.search_env = {**self.search_env, **env}
        port = free_port()
        self.procs["search"] = self._start_search(f"search-{port}", port)
        await self.procs["search"].wait_ready_async(300)
        return self.procs["search"]

    @property
    def search(self) -> ManagedProcess:
        return self.procs["search"]

    def stop(self) -> None:
        for name in ("search", "captioner", "embedder", "milvus"):
            if name in self.procs:
                self.procs[name].stop(30)

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


def search_answers(address: str) -> bool:
    """A readiness probe (`ProcessSpec.ready`): the search service answers Stats, so its
    start-up hook has run, for runs where its health stays NOT_SERVING on purpose."""
    import grpc

    from mmsearch.search.v1 import search_pb2, search_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            search_pb2_grpc.SearchStub(channel).Stats(search_pb2.StatsRequest(), timeout=10)
        except grpc.RpcError:
            return False
    return True


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
