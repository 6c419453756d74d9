"""The Captioner gRPC service end to end on loopback: contract, bad input, health,
metrics, URIs, and `python -m services.captioner` as a real process."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import signal
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mmsearch.captioner.v1 import captioner_pb2
from mmsearch.common.v1 import types_pb2
from mmsearch.suite import ManagedProcess, free_port, service_spec
from services.captioner.servicer import SERVICE_NAME
from services.common.settings import UriSettings
from tests.captioner.conftest import API_KEY, caption_request, remote_settings, serve
from tests.captioner.fakes import FakeUpstream
from tests.conftest import png_bytes

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def fake() -> FakeUpstream:
    upstream = FakeUpstream(protocol="openai", api_key=API_KEY).start()
    yield upstream
    upstream.stop()


async def _expect_invalid(call: object) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    return err.value.details()


async def test_bad_input_is_invalid_argument_and_the_server_keeps_answering(fake: FakeUpstream) -> None:
    async with serve(remote_settings(fake, max_batch_items=3)) as s:
        stub = s.stub
        assert "image is missing" in await _expect_invalid(stub.Caption(captioner_pb2.CaptionRequest(), timeout=5))
        assert "image is missing" in await _expect_invalid(
            stub.Caption(captioner_pb2.CaptionRequest(image=types_pb2.Image()), timeout=5)
        )
        assert "not a recognised image" in await _expect_invalid(
            stub.Caption(caption_request(b"GIF89a-nope"), timeout=5)
        )
        truncated = png_bytes(64, 64)[:60]
        await _expect_invalid(stub.Caption(caption_request(truncated), timeout=5))
        assert "empty" in await _expect_invalid(stub.Caption(caption_request(b""), timeout=5))
        assert "2000" in await _expect_invalid(stub.Caption(caption_request(png_bytes(), prompt="x" * 2001), timeout=5))
        assert "max_words" in await _expect_invalid(
            stub.Caption(caption_request(png_bytes(), max_words=100_000), timeout=5)
        )
        assert "language" in await _expect_invalid(stub.Caption(caption_request(png_bytes(), language=7), timeout=5))
        assert "file:// URIs are disabled" in await _expect_invalid(
            stub.Caption(captioner_pb2.CaptionRequest(image=types_pb2.Image(uri="file:///etc/passwd")), timeout=5)
        )
        too_many = captioner_pb2.CaptionBatchRequest(requests=[caption_request(png_bytes())] * 4)
        assert "max_batch_items=3" in await _expect_invalid(stub.CaptionBatch(too_many, timeout=5))
        assert "empty" in await _expect_invalid(stub.CaptionBatch(captioner_pb2.CaptionBatchRequest(), timeout=5))
        assert fake.calls == 0  # nothing bad reached the upstream
        ok = await stub.Caption(caption_request(png_bytes()))  # no deadline at all: the server's applies
        assert ok.caption.keywords
        health = health_pb2_grpc.HealthStub(s.channel)
        status = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING


async def test_info_reports_backend_and_limits(fake: FakeUpstream) -> None:
    async with serve(remote_settings(fake, model="qwen3-vl-8b", max_batch_items=7)) as s:
        info = await s.stub.Info(captioner_pb2.InfoRequest(), timeout=5)
    assert (info.backend, info.model_id, info.max_batch_items) == ("openai", "qwen3-vl-8b", 7)
    assert info.max_image_bytes == 20 * 1024 * 1024


async def test_image_by_file_uri_inside_the_root(fake: FakeUpstream, tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(png_bytes(50, 40))
    settings = remote_settings(fake, uris=UriSettings(file_root=tmp_path))
    async with serve(settings) as s:
        response = await s.stub.Caption(
            captioner_pb2.CaptionRequest(image=types_pb2.Image(uri=f"file://{tmp_path}/a.png")), timeout=5
        )
        assert response.caption.description
        await _expect_invalid(
            s.stub.Caption(
                captioner_pb2.CaptionRequest(image=types_pb2.Image(uri=f"file://{tmp_path}/../x.png")), timeout=5
            )
        )


async def test_metrics_endpoint_exports_captioner_series(fake: FakeUpstream) -> None:
    async with serve(remote_settings(fake, metrics_port=0)) as s:
        await s.stub.Caption(caption_request(png_bytes(12, 34)), timeout=5)
        port = s.running.metrics_port
        text = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        )
    for series in (
        'captioner_captions_total{backend="openai",outcome="ok"}',
        'captioner_upstream_seconds_bucket{backend="openai"',
        "captioner_upstream_retries_total",
        "captioner_cache_hits_total",
        "captioner_cache_misses_total",
        'grpc_server_handled_total{grpc_code="OK",grpc_method="Caption"',
    ):
        assert series in text, series
    assert API_KEY not in text


async def test_batch_items_are_captioned_concurrently_in_order(fake: FakeUpstream) -> None:
    fake.text = "A red square.\nKeywords: red, square"
    images = [png_bytes(60 + i, 20) for i in range(5)]
    async with serve(remote_settings(fake)) as s:
        response = await s.stub.CaptionBatch(
            captioner_pb2.CaptionBatchRequest(requests=[caption_request(b) for b in images]), timeout=10
        )
    assert [r.caption.keywords[:] for r in response.results] == [["red", "square"]] * 5
    assert fake.calls == 5


def test_python_dash_m_serves_the_lite_backend_from_env(tmp_path: Path) -> None:
    """The real entry point: settings from CAPTIONER_*, model loaded and warmed before SERVING,
    a real caption, graceful exit on SIGTERM."""
    from services.lite_models.sample_photos import load_sample_photos

    env = {
        "CAPTIONER_BACKEND": "lite",
        "CAPTIONER_SHUTDOWN_GRACE_S": "1",
        "CAPTIONER_API_KEY": "sk-should-never-be-printed-123",
        "PYTHONPATH": str(REPO),
    }
    spec = dataclasses.replace(service_spec("captioner", free_port(), env, cwd=str(REPO)), health_service=SERVICE_NAME)
    proc = ManagedProcess(spec, log_file=tmp_path / "captioner.log").start()
    try:
        proc.wait_ready(60)
        photo = load_sample_photos(["coffee"])[0].image
        buf = io.BytesIO()
        photo.save(buf, format="JPEG")
        from mmsearch.captioner.v1 import captioner_pb2_grpc

        with grpc.insecure_channel(proc.address) as channel:
            reply = captioner_pb2_grpc.CaptionerStub(channel).Caption(caption_request(buf.getvalue()), timeout=20)
        assert "espresso" in reply.caption.keywords
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(20)
    finally:
        proc.stop(grace_s=0)
    assert code == 0, proc.log()
    logs = proc.log()
    assert '"serving": true' in logs or "serving=True" in logs or '"serving":true' in logs, logs
    assert "sk-should-never-be-printed-123" not in logs
