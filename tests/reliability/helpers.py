"""Shared by the reliability and security tests: small distinct images, services in this
process or as real `python -m services.<name>` processes (to kill -9 them, read their RSS
and capture every log line they write), and ingest bookkeeping."""
from __future__ import annotations

import asyncio
import contextlib
import io
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from mmsearch.common.v1 import types_pb2
from mmsearch.search.v1 import search_pb2, search_pb2_grpc
from mmsearch.suite import ManagedProcess, free_port, service_spec
from services.common.server import RunningServer, start_server

ROOT = Path(__file__).resolve().parents[2]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# --- images ---------------------------------------------------------------------------------


def distinct_images(n: int, size: int = 64, fmt: str = "PNG", seed: int = 0) -> list[bytes]:
    """`n` small images with different pixels (so different content-hash ids): an 8x8 grid
    of random colours scaled up, cheap to decode and to embed."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        cells = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(cells).resize((size, size), Image.Resampling.NEAREST)
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


def items_of(images: Iterable[bytes], **kw: Any) -> list[search_pb2.IngestItem]:
    return [search_pb2.IngestItem(image=types_pb2.Image(data=d), **kw) for d in images]


def chunks(items: list[search_pb2.IngestItem], size: int = 25) -> list[search_pb2.IngestRequest]:
    return [search_pb2.IngestRequest(items=items[i : i + size]) for i in range(0, len(items), size)]


@dataclass
class IngestRun:
    """Every outcome of one Ingest call, by stream index; a second outcome for an index fails."""

    outcomes: dict[int, search_pb2.ItemOutcome] = field(default_factory=dict)
    progress: search_pb2.IngestProgress = field(default_factory=search_pb2.IngestProgress)

    def add(self, reply: search_pb2.IngestResponse) -> None:
        for o in reply.outcomes:
            assert o.index not in self.outcomes, f"item {o.index} got two outcomes"
            self.outcomes[o.index] = o
        self.progress = reply.progress

    def with_status(self, status: int) -> dict[int, search_pb2.ItemOutcome]:
        return {i: o for i, o in self.outcomes.items() if o.status == status}

    @property
    def failed(self) -> dict[int, search_pb2.ItemOutcome]:
        return self.with_status(search_pb2.ITEM_STATUS_FAILED)

    @property
    def stored(self) -> dict[int, search_pb2.ItemOutcome]:
        return self.with_status(search_pb2.ITEM_STATUS_STORED)


async def ingest_all(stub: search_pb2_grpc.SearchStub, items: list[search_pb2.IngestItem],
                     timeout_s: float = 300, metadata: Any = None) -> IngestRun:
    run = IngestRun()
    async for reply in stub.Ingest(iter(chunks(items)), timeout=timeout_s, metadata=metadata):
        run.add(reply)
    return run


# --- health ---------------------------------------------------------------------------------


async def health_of(address: str, service: str = "", creds: grpc.ChannelCredentials | None = None,
                    options: Any = None) -> int:
    """The health status, or -1 when nothing answers."""
    channel = (grpc.aio.secure_channel(address, creds, options=options) if creds
               else grpc.aio.insecure_channel(address))
    async with channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2)
        except grpc.aio.AioRpcError:
            return -1
        return reply.status


async def wait_health(address: str, status: int, within_s: float, what: str = "", service: str = "") -> float:
    start = time.monotonic()
    while time.monotonic() - start < within_s:
        if await health_of(address, service) == status:
            return time.monotonic() - start
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what or address} did not reach health {status} within {within_s} s")


# --- services in this process -----------------------------------------------------------------


async def start_embedder(**overrides: Any) -> RunningServer:
    from services.embedder.app import create_app
    from services.embedder.settings import EmbedderSettings

    settings = EmbedderSettings(**{"host": "127.0.0.1", "grpc_port": 0, "metrics_port": -1, **overrides})
    return await start_server(settings, create_app(settings))


async def start_captioner(**overrides: Any) -> RunningServer:
    from services.captioner.app import build_app
    from services.captioner.settings import CaptionerSettings

    settings = CaptionerSettings(**{"host": "127.0.0.1", "grpc_port": 0, "metrics_port": -1, **overrides})
    return await start_server(settings, build_app(settings))


async def start_search(milvus_uri: str, embedder: str, captioner: str, **overrides: Any) -> RunningServer:
    from services.search.app import SearchService
    from services.search.settings import SearchSettings

    settings = SearchSettings(**{
        "host": "127.0.0.1", "grpc_port": 0, "metrics_port": -1, "milvus_uri": milvus_uri,
        "embedder_target": embedder, "captioner_target": captioner, "upstream_timeout_s": 30, **overrides,
    })
    return await start_server(settings, SearchService(settings).app())


# --- services as processes ------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MiB, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class ServiceProcess(ManagedProcess):
    """`python -m services.<name>` (the launcher's `ManagedProcess`) with `<PREFIX>_*`
    settings and a 1 s shutdown grace unless `env` says otherwise; every line it writes goes
    to `<log_dir>/<name>.log`. The port is chosen once, so a restart after `kill9()` listens
    where clients already dial. Started from the main thread, it dies with the test process."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        super().__init__(service_spec(name, self.port, {f"{name.upper()}_SHUTDOWN_GRACE_S": "1", **env}, cwd=str(ROOT)),
                         log_file=log_dir / f"{name}.log")


@contextlib.contextmanager
def dashscope_fakes(key: str, dimension: int = 64) -> Iterator[tuple[Any, Any]]:
    """The captioner's and the embedder's DashScope-protocol fakes, started and stopped."""
    from tests.captioner.fakes import FakeUpstream
    from tests.embedder.dashscope_fake import FakeDashScope

    captioner = FakeUpstream(protocol="dashscope", api_key=key).start()
    embedder = FakeDashScope(api_key=key, dimension=dimension).start()
    try:
        yield captioner, embedder
    finally:
        captioner.stop()
        embedder.stop()
