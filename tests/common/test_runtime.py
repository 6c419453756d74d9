"""The shared runtime over real gRPC on loopback: health, reflection, metrics, auth, drain."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pydantic import SecretStr

from mmsearch.captioner.v1 import captioner_pb2, captioner_pb2_grpc
from mmsearch.common.v1 import types_pb2
from services.common.server import RunningServer, start_server
from tests.common.runtime_app import RuntimeTestSettings, make_app
from tests.conftest import png_bytes

CAPTIONER = "mmsearch.captioner.v1.Captioner"


@pytest.fixture
async def running() -> AsyncIterator[RunningServer]:
    settings = RuntimeTestSettings(host="127.0.0.1", grpc_port=0, metrics_port=0)
    server = await start_server(settings, make_app(settings))
    yield server
    await server.stop(0.5)


async def test_health_is_serving(running: RunningServer) -> None:
    async with grpc.aio.insecure_channel(running.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", CAPTIONER):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_every_service(running: RunningServer) -> None:
    async with grpc.aio.insecure_channel(running.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name async for r in responses for s in r.list_services_response.service}
    assert {CAPTIONER, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


def _metric(port: int, name: str, labels: dict[str, str]) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    want = {f'{k}="{v}"' for k, v in labels.items()}
    for line in body.splitlines():
        if line.startswith(name + "{"):
            inside = line[len(name) + 1 : line.index("}")]
            if want <= set(inside.split(",")):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def _metric_once_at(port: int, name: str, labels: dict[str, str], expected: float) -> float:
    """The series' value once it equals `expected`, or its value after 5 s. An aborted call's
    status reaches the caller before its handler's `finally` records it (grpc.aio sends the
    status inside `context.abort`), so a read right after the caller's error may miss it
    (seen once in CI). Read off the event loop, which must run that `finally`."""
    deadline = time.monotonic() + 5.0
    while True:
        value = await asyncio.to_thread(_metric, port, name, labels)
        if value == expected or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.01)


async def test_calls_increment_standard_metric_series(running: RunningServer) -> None:
    assert running.metrics_port
    base = {"grpc_service": CAPTIONER, "grpc_method": "Info", "grpc_type": "unary"}
    ok_before = _metric(running.metrics_port, "grpc_server_handled_total", {**base, "grpc_code": "OK"})
    started_before = _metric(running.metrics_port, "grpc_server_started_total", base)
    bad = {**base, "grpc_method": "Caption", "grpc_code": "InvalidArgument"}
    bad_before = _metric(running.metrics_port, "grpc_server_handled_total", bad)
    async with grpc.aio.insecure_channel(running.address) as channel:
        stub = captioner_pb2_grpc.CaptionerStub(channel)
        await stub.Info(captioner_pb2.InfoRequest())
        await stub.Info(captioner_pb2.InfoRequest())
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Caption(captioner_pb2.CaptionRequest(image=types_pb2.Image(data=b"nope")))
    port = running.metrics_port
    assert _metric(port, "grpc_server_handled_total", {**base, "grpc_code": "OK"}) == ok_before + 2
    assert _metric(port, "grpc_server_started_total", base) == started_before + 2
    assert await _metric_once_at(port, "grpc_server_handled_total", bad, bad_before + 1) == bad_before + 1
    assert _metric(port, "grpc_server_handling_seconds_count", base) >= 2
    assert _metric(port, "grpc_server_msg_received_total", base) >= 2


async def test_bearer_token_required_but_health_open() -> None:
    settings = RuntimeTestSettings(
        host="127.0.0.1", grpc_port=0, metrics_port=-1, auth_tokens=[SecretStr("s3cret-token")]
    )
    server = await start_server(settings, make_app(settings))
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = captioner_pb2_grpc.CaptionerStub(channel)
            for metadata in (None, (("authorization", "Bearer wrong"),), (("authorization", "s3cret-token"),)):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Info(captioner_pb2.InfoRequest(), metadata=metadata)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            ok = await stub.Info(captioner_pb2.InfoRequest(), metadata=(("authorization", "Bearer s3cret-token"),))
            assert ok.backend == "test"
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(0.5)


async def test_sigterm_drains_in_flight_call() -> None:
    env = {**os.environ, "RUNTIME_TEST_HOST": "127.0.0.1", "RUNTIME_TEST_GRPC_PORT": "0",
           "RUNTIME_TEST_METRICS_PORT": "-1", "RUNTIME_TEST_SHUTDOWN_GRACE_S": "10"}
    proc = subprocess.Popen([sys.executable, "-m", "tests.common.runtime_app"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        deadline = time.monotonic() + 30
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()  # type: ignore[union-attr]
            if line.startswith("{") and json.loads(line).get("event") == "started":
                port = json.loads(line)["port"]
        assert port, "server did not start"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = captioner_pb2_grpc.CaptionerStub(channel)
            # Holds the call ~1.5 s; SIGTERM arrives while it is in flight.
            call = stub.Caption(captioner_pb2.CaptionRequest(image=types_pb2.Image(data=png_bytes()), max_words=1500))
            await asyncio.sleep(0.4)
            proc.send_signal(signal.SIGTERM)
            reply = await call
            assert reply.caption.description == "32x24 PNG"
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
