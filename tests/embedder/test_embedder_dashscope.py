"""The dashscope backend through the real gRPC service against a local DashScope protocol server."""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from PIL import Image

from mmsearch.embedder.v1 import embedder_pb2
from services.common.images import decode_image
from services.common.settings import ImageLimits, RetrySettings
from services.embedder.backends.base import l2_normalize
from services.embedder.backends.dashscope import DashScopeBackend
from services.embedder.settings import DashScopeSettings, EmbedderSettings
from tests.embedder.conftest import encode, image, make_settings, metric, serve, text
from tests.embedder.dashscope_fake import BAD_GATEWAY, INTERNAL_ERROR, THROTTLED, FakeDashScope, fake_vector

API_KEY = "sk-ds-test-9f8e7d6c5b4a3210"


@pytest.fixture
def fake() -> Iterator[FakeDashScope]:
    server = FakeDashScope(api_key=API_KEY, max_contents=10, max_images=1).start()
    yield server
    server.stop()


def settings_for(fake: FakeDashScope, **dashscope: object) -> EmbedderSettings:
    ds = DashScopeSettings(
        api_key=API_KEY,
        base_url=fake.base_url,
        max_contents_per_call=10,
        max_images_per_call=1,
        request_timeout_s=5.0,
        retry=RetrySettings(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.05, budget_s=5.0),
        **dashscope,
    )
    return make_settings(backend="dashscope", dashscope=ds, max_queue_delay_ms=2)


def expected(content: dict[str, str]) -> np.ndarray:
    return l2_normalize(fake_vector(content, 1024))


def photo(color: tuple[int, int, int]) -> bytes:
    return encode(Image.new("RGB", (40, 30), color), "JPEG")


async def test_texts_and_images_follow_the_protocol(fake: FakeDashScope) -> None:
    settings = settings_for(fake)
    red, blue = photo((220, 20, 20)), photo((20, 20, 220))
    async with serve(settings, DashScopeBackend.from_settings(settings)) as served:
        info = await served.stub.Info(embedder_pb2.InfoRequest())
        assert (info.backend, info.model_id, info.dimension) == ("dashscope", "dashscope:multimodal-embedding-v1", 1024)
        reply = await served.embed(text("a red square"), image(red), text("a blue square"), image(blue))
    assert reply.dimension == 1024 and len(reply.embeddings) == 4
    got = np.array([e.values for e in reply.embeddings], dtype=np.float32)
    red_uri = "data:image/jpeg;base64," + base64.b64encode(red).decode()
    blue_uri = "data:image/jpeg;base64," + base64.b64encode(blue).decode()
    want = np.stack(
        [
            expected({"text": "a red square"}),
            expected({"image": red_uri}),
            expected({"text": "a blue square"}),
            expected({"image": blue_uri}),
        ]
    )
    np.testing.assert_allclose(got, want, atol=1e-6)
    request = fake.requests[-1]
    assert request["headers"]["Authorization"] == f"Bearer {API_KEY}"
    assert request["body"]["model"] == "multimodal-embedding-v1"
    # Every image went inline as a data URI of the original JPEG bytes.
    sent_images = [c["image"] for call in fake.calls() for c in call if "image" in c]
    assert sorted(sent_images) == sorted([red_uri, blue_uri])


async def test_batches_are_split_to_the_per_call_limits(fake: FakeDashScope) -> None:
    settings = settings_for(fake)
    texts = [f"caption number {i}" for i in range(25)]
    images = [photo((i * 40, 100, 200 - i * 30)) for i in range(3)]
    async with serve(settings, DashScopeBackend.from_settings(settings)) as served:
        reply = await served.embed(*[text(t) for t in texts], *[image(b) for b in images])
    calls = fake.calls()
    assert all(len(c) <= 10 for c in calls)
    assert all(sum("image" in x for x in c) <= 1 for c in calls)
    assert sorted(len(c) for c in calls if "text" in c[0]) == [5, 10, 10]
    assert sum(1 for c in calls if "image" in c[0]) == 3
    got = np.array([e.values for e in reply.embeddings[:25]], dtype=np.float32)
    np.testing.assert_allclose(got, np.stack([expected({"text": t}) for t in texts]), atol=1e-6)


async def test_throttling_is_retried_then_succeeds(fake: FakeDashScope) -> None:
    settings = settings_for(fake)
    fake.script.extend([THROTTLED, BAD_GATEWAY])
    throttled = metric("embedder_upstream_requests_total", outcome="throttled")
    async with serve(settings, DashScopeBackend.from_settings(settings)) as served:
        reply = await served.embed(text("hello"))
    np.testing.assert_allclose(reply.embeddings[0].values, expected({"text": "hello"}), atol=1e-6)
    assert len(fake.calls()) == 3  # 429, 502, then 200
    assert metric("embedder_upstream_requests_total", outcome="throttled") == throttled + 1


async def test_a_5xx_storm_beyond_the_retry_budget_is_unavailable(fake: FakeDashScope) -> None:
    settings = settings_for(fake)
    fake.always = INTERNAL_ERROR
    async with serve(settings, DashScopeBackend.from_settings(settings)) as served:
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await served.embed(text("hello"))
        assert time.monotonic() - started < 3
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "after 3 attempts" in caught.value.details()
        assert "InternalError" in caught.value.details() and "internal error has occured" in caught.value.details()
        assert len(fake.calls()) == 3  # max_attempts, no more
        # Server pushback: callers' gRPC retry policies must not multiply our attempts.
        assert ("grpc-retry-pushback-ms", "-1") in tuple(caught.value.trailing_metadata() or ())
        fake.always = None
        ok = await served.embed(text("hello"))  # the server is fine once upstream recovers
        assert len(ok.embeddings) == 1


async def test_upstream_rejection_of_input_is_invalid_argument(fake: FakeDashScope) -> None:
    settings = settings_for(fake)
    fake.script.append((400, {"code": "InvalidParameter", "message": "The image is not supported."}))
    async with serve(settings, DashScopeBackend.from_settings(settings)) as served:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await served.embed(image(photo((1, 2, 3))))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "The image is not supported" in caught.value.details()
    assert len(fake.calls()) == 1  # 4xx is not retried


async def test_api_key_is_never_logged(
    fake: FakeDashScope, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = settings_for(fake)
    # An upstream that echoes the key in its error message must not leak it either.
    fake.always = (500, {"code": "InternalError", "message": f"backend saw key {API_KEY}"})
    async with serve(settings, DashScopeBackend.from_settings(settings)) as served:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await served.embed(text("hello"))
    assert API_KEY not in caught.value.details()
    assert "***" in caught.value.details()
    out, err = capfd.readouterr()
    assert "dashscope call failed; retrying" in caplog.text + out + err  # we did log the retries
    assert API_KEY not in caplog.text
    assert API_KEY not in out + err
    assert API_KEY not in repr(settings)


async def test_text_naming_a_local_file_is_sent_as_text(fake: FakeDashScope, tmp_path: object) -> None:
    # The SDK would upload a local file named by a content string; ours sends the text.
    settings = settings_for(fake)
    async with serve(settings, DashScopeBackend.from_settings(settings)) as served:
        await served.embed(text(__file__))
    assert fake.calls()[-1] == [{"text": __file__}]


async def test_missing_api_key_fails_start(monkeypatch: pytest.MonkeyPatch, fake: FakeDashScope) -> None:
    monkeypatch.delenv("DASHSCOPE_API_KEY", raising=False)
    settings = settings_for(fake)
    settings.dashscope.api_key = None
    with pytest.raises(RuntimeError, match="EMBEDDER_DASHSCOPE__API_KEY"):
        async with serve(settings, DashScopeBackend.from_settings(settings)):
            pass


def test_large_or_unsupported_images_are_reencoded_under_the_limit() -> None:
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 255, (900, 900, 3), dtype=np.uint8))
    data = encode(noisy, "PNG")  # ~2.4 MB of noise
    decoded = decode_image(data, ImageLimits())
    uri = DashScopeBackend(DashScopeSettings(max_image_bytes=200_000)).preprocess_image(decoded, data)
    assert uri.startswith("data:image/jpeg;base64,")
    assert len(base64.b64decode(uri.split(",", 1)[1])) <= 200_000
    webp = encode(Image.new("RGB", (20, 20), (1, 2, 3)), "WEBP")
    backend = DashScopeBackend(DashScopeSettings())
    assert backend.preprocess_image(decode_image(webp, ImageLimits()), webp).startswith("data:image/jpeg;base64,")
