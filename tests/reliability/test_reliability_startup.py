"""A service whose port is open but whose model is still loading (a pod just restarted
after a crash) refuses calls with a retryable UNAVAILABLE; it never lets them reach the
half-loaded app, which answered INTERNAL before (seen with the lite captioner after kill -9).
Health answers meanwhile (NOT_SERVING), and the same call succeeds once loading is done."""
from __future__ import annotations

import asyncio
import dataclasses

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mmsearch.captioner.v1 import captioner_pb2, captioner_pb2_grpc
from mmsearch.common.v1 import types_pb2
from services.common.server import start_server
from tests.common.runtime_app import RuntimeTestSettings, make_app
from tests.conftest import free_port, png_bytes


async def test_calls_during_startup_are_unavailable_then_served() -> None:
    loaded = asyncio.Event()

    async def slow_load() -> None:
        await loaded.wait()

    settings = RuntimeTestSettings(host="127.0.0.1", grpc_port=free_port(), metrics_port=-1)
    app = dataclasses.replace(make_app(settings), on_start=slow_load)
    starting = asyncio.create_task(start_server(settings, app))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{settings.grpc_port}") as channel:
            await channel.channel_ready()
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
            stub = captioner_pb2_grpc.CaptionerStub(channel)
            request = captioner_pb2.CaptionRequest(image=types_pb2.Image(data=png_bytes()))
            for call in (stub.Caption(request, timeout=5), stub.Info(captioner_pb2.InfoRequest(), timeout=5)):
                try:
                    await call
                    raise AssertionError("a call reached the app before it had started")
                except grpc.aio.AioRpcError as e:
                    assert e.code() == grpc.StatusCode.UNAVAILABLE
                    assert "starting" in (e.details() or "")
            loaded.set()
            running = await asyncio.wait_for(starting, 10)
            assert (await stub.Caption(request, timeout=5)).caption.description == "32x24 PNG"
            await running.stop(0)
    finally:
        loaded.set()
        if not starting.done():
            starting.cancel()


async def test_a_failed_start_leaves_nothing_listening() -> None:
    async def broken_load() -> None:
        raise RuntimeError("weights missing")

    settings = RuntimeTestSettings(host="127.0.0.1", grpc_port=free_port(), metrics_port=-1)
    app = dataclasses.replace(make_app(settings), on_start=broken_load)
    try:
        await start_server(settings, app)
        raise AssertionError("start_server should have raised")
    except RuntimeError as e:
        assert "weights missing" in str(e)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{settings.grpc_port}") as channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            raise AssertionError("the port still answers after a failed start")
        except grpc.aio.AioRpcError as e:
            assert e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


async def test_a_call_outliving_its_connections_age_is_not_cut() -> None:
    """Connections age out (clients re-resolve and rebalance), but a call in flight, such as
    a long Ingest stream, runs to its end on the old connection."""
    settings = RuntimeTestSettings(host="127.0.0.1", grpc_port=0, metrics_port=-1, max_connection_age_s=1,
                                   shutdown_grace_s=0.5)
    running = await start_server(settings, make_app(settings))
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            stub = captioner_pb2_grpc.CaptionerStub(channel)
            # The runtime test app sleeps max_words milliseconds: 3.5 s, past age + grace.
            reply = await stub.Caption(captioner_pb2.CaptionRequest(image=types_pb2.Image(data=png_bytes()),
                                                                    max_words=3500), timeout=30)
            assert reply.caption.description == "32x24 PNG"
            # New calls keep working on a fresh connection.
            assert (await stub.Info(captioner_pb2.InfoRequest(), timeout=5)).backend == "test"
    finally:
        await running.stop(0)
