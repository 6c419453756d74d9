"""Fixtures: a captioner served on loopback gRPC around any backend, fake upstreams."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from mmsearch.captioner.v1 import captioner_pb2, captioner_pb2_grpc
from mmsearch.common.v1 import types_pb2
from services.captioner.app import captioner_app
from services.captioner.backends import CaptionBackend, make_backend
from services.captioner.service import CaptionService
from services.captioner.settings import CaptionerSettings
from services.common.server import RunningServer, start_server
from services.common.settings import RetrySettings
from tests.captioner.fakes import FakeUpstream

API_KEY = "sk-test-Zq8v1LmN0pQrStUvWxYz"


def make_settings(**overrides: Any) -> CaptionerSettings:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "grpc_port": 0,
        # -1: no /metrics HTTP server per test (its shutdown polls every 0.5 s); the
        # end-to-end test scrapes a real one on port 0.
        "metrics_port": -1,
        "log_json": False,
        "retry": RetrySettings(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.05, budget_s=5.0),
        "request_timeout_s": 5.0,
        "call_deadline_s": 10.0,
        "shutdown_grace_s": 0.5,
    }
    values.update(overrides)
    return CaptionerSettings(**values)


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@dataclass
class Served:
    stub: captioner_pb2_grpc.CaptionerStub
    service: CaptionService
    running: RunningServer
    channel: grpc.aio.Channel


@contextlib.asynccontextmanager
async def serve(settings: CaptionerSettings, backend: CaptionBackend | None = None) -> AsyncIterator[Served]:
    service = CaptionService(settings, backend or make_backend(settings))
    running = await start_server(settings, captioner_app(service))
    channel = grpc.aio.insecure_channel(running.address)
    try:
        yield Served(captioner_pb2_grpc.CaptionerStub(channel), service, running, channel)
    finally:
        await channel.close()
        await running.stop(0.05)


def caption_request(data: bytes, **kwargs: Any) -> captioner_pb2.CaptionRequest:
    return captioner_pb2.CaptionRequest(image=types_pb2.Image(data=data), **kwargs)


@pytest.fixture(params=["dashscope", "openai"])
def upstream(request: pytest.FixtureRequest) -> Iterator[FakeUpstream]:
    fake = FakeUpstream(protocol=request.param, api_key=API_KEY).start()
    try:
        yield fake
    finally:
        fake.stop()


def remote_settings(fake: FakeUpstream, **overrides: Any) -> CaptionerSettings:
    values: dict[str, Any] = {"backend": fake.protocol, "base_url": fake.base_url, "api_key": API_KEY}
    values.update(overrides)
    return make_settings(**values)
