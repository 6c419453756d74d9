"""Fixtures: the embedder served on loopback gRPC around any backend."""

from __future__ import annotations

import contextlib
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc.experimental.aio import init_grpc_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from prometheus_client import REGISTRY

from mmsearch.common.v1 import types_pb2
from mmsearch.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from services.common.server import RunningServer, start_server
from services.embedder.app import create_app
from services.embedder.backends.base import EmbeddingBackend
from services.embedder.backends.clip import ClipBackend
from services.embedder.engine import EmbeddingEngine
from services.embedder.settings import EmbedderSettings

# grpc.aio shuts its poller down when the last aio object of the process is collected;
# with a fresh event loop per test that can happen mid-session and deadlock joining the
# poller thread (grpc/grpc#22365, #40989). One early init keeps the poller alive.
init_grpc_aio()


def make_settings(**overrides: Any) -> EmbedderSettings:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "grpc_port": 0,
        "metrics_port": 0,
        "log_json": False,
        "shutdown_grace_s": 0.5,
        "device": "cpu",
    }
    values.update(overrides)
    return EmbedderSettings(**values)


@dataclass
class Served:
    stub: embedder_pb2_grpc.EmbedderStub
    health: health_pb2_grpc.HealthStub
    running: RunningServer
    engine: EmbeddingEngine

    async def embed(self, *items: types_pb2.Content, timeout: float = 30.0) -> embedder_pb2.EmbedResponse:
        return await self.stub.Embed(embedder_pb2.EmbedRequest(items=list(items)), timeout=timeout)

    async def health_status(self) -> int:
        reply = await self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        return reply.status


@contextlib.asynccontextmanager
async def serve(settings: EmbedderSettings, backend: EmbeddingBackend) -> AsyncIterator[Served]:
    engine = EmbeddingEngine(settings, backend)
    running = await start_server(settings, create_app(settings, engine))
    channel = grpc.aio.insecure_channel(running.address)
    try:
        yield Served(embedder_pb2_grpc.EmbedderStub(channel), health_pb2_grpc.HealthStub(channel), running, engine)
    finally:
        await channel.close()
        await running.stop(0.2)


def text(value: str) -> types_pb2.Content:
    return types_pb2.Content(text=value)


def image(data: bytes) -> types_pb2.Content:
    return types_pb2.Content(image=types_pb2.Image(data=data))


def composed(data: bytes, instruction: str, weight: float = 0.0) -> types_pb2.Content:
    return types_pb2.Content(
        composed=types_pb2.Composed(
            image=types_pb2.Image(data=data), instruction=instruction, instruction_weight=weight
        )
    )


def encode(img: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def metric(name: str, **labels: str) -> float:
    """Current value of a sample in the process-wide registry (0 when absent)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CLIP checkpoint in the real format (built once per session)."""
    from tests.embedder.tiny_clip import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip")


@pytest.fixture(scope="session")
def clip_backend(clip_dir: Path) -> ClipBackend:
    """Loaded once, served by many short-lived servers (load is idempotent)."""
    return ClipBackend(clip_dir, device="cpu", dtype="float32")
