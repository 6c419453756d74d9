"""DashScope and OpenAI-compatible backends through the real gRPC service and real SDKs,
against local servers that speak each protocol on the wire."""

from __future__ import annotations

import asyncio
import base64
import logging

import grpc
import pytest

from mmsearch.captioner.v1 import captioner_pb2, captioner_pb2_grpc
from services.common.channels import create_channel
from services.common.settings import RetrySettings
from tests.captioner.conftest import API_KEY, caption_request, metric, remote_settings, serve
from tests.captioner.fakes import FakeUpstream, Reply
from tests.conftest import jpeg_bytes, png_bytes


def _sent_image_and_prompt(fake: FakeUpstream, index: int = -1) -> tuple[str, str]:
    body = fake.requests[index].body
    if fake.protocol == "dashscope":
        content = body["input"]["messages"][0]["content"]
        return next(p["image"] for p in content if "image" in p), next(p["text"] for p in content if "text" in p)
    content = body["messages"][0]["content"]
    return (
        next(p["image_url"]["url"] for p in content if p["type"] == "image_url"),
        next(p["text"] for p in content if p["type"] == "text"),
    )


async def test_success_parses_the_answer_and_sends_the_tutorial_prompt(upstream: FakeUpstream) -> None:
    image = jpeg_bytes()
    async with serve(remote_settings(upstream)) as s:
        response = await s.stub.Caption(caption_request(image), timeout=10)
    caption = response.caption
    assert caption.description == "A cat sleeps on a sofa."
    assert list(caption.keywords) == ["cat", "sofa", "sleeping", "pet", "indoor"]
    assert caption.raw_text == upstream.text
    assert caption.model_id == ("qwen-vl-plus" if upstream.protocol == "dashscope" else "Qwen/Qwen2.5-VL-7B-Instruct")
    assert not caption.cached
    sent_image, prompt = _sent_image_and_prompt(upstream)
    assert prompt == "First, describe this image in under 50 words, and then provide 5 keywords"
    assert sent_image == "data:image/jpeg;base64," + base64.b64encode(image).decode()  # small JPEG: sent as is
    assert upstream.requests[-1].body["model"] == caption.model_id


async def test_language_and_word_limit_go_into_the_prompt(upstream: FakeUpstream) -> None:
    upstream.text = "一只猫在沙发上睡觉。\n关键词：猫，沙发，睡觉"
    async with serve(remote_settings(upstream)) as s:
        zh = await s.stub.Caption(
            caption_request(png_bytes(), language=captioner_pb2.LANGUAGE_ZH, max_words=20), timeout=10
        )
        _, prompt_zh = _sent_image_and_prompt(upstream)
        await s.stub.Caption(
            caption_request(
                png_bytes(),
                prompt="What is in this picture? List keywords.",
                max_words=12,
                language=captioner_pb2.LANGUAGE_EN,
            ),
            timeout=10,
        )
        _, prompt_custom = _sent_image_and_prompt(upstream)
    assert list(zh.caption.keywords) == ["猫", "沙发", "睡觉"]
    assert prompt_zh == "首先，用不超过20个词描述这张图片，然后给出5个关键词"
    assert prompt_custom.startswith("What is in this picture? List keywords.")
    assert "at most 12 words" in prompt_custom and "Answer in English." in prompt_custom


async def test_429_then_success_is_retried_and_counted(upstream: FakeUpstream) -> None:
    upstream.script.append(
        upstream.error(429, "Throttling.RateQuota", "Requests rate limit exceeded, please try again later.")
    )
    before = metric("captioner_upstream_retries_total", backend=upstream.protocol)
    errors_before = metric("captioner_upstream_errors_total", backend=upstream.protocol, kind="rate_limited")
    async with serve(remote_settings(upstream)) as s:
        response = await s.stub.Caption(caption_request(png_bytes()), timeout=10)
    assert response.caption.keywords[0] == "cat"
    assert upstream.calls == 2
    assert metric("captioner_upstream_retries_total", backend=upstream.protocol) == before + 1
    assert (
        metric("captioner_upstream_errors_total", backend=upstream.protocol, kind="rate_limited") == errors_before + 1
    )


async def test_persistent_429_is_resource_exhausted(upstream: FakeUpstream) -> None:
    upstream.default = upstream.error(
        429, "Throttling.RateQuota", "Requests rate limit exceeded, please try again later."
    )
    async with serve(remote_settings(upstream)) as s:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.stub.Caption(caption_request(png_bytes()), timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "rate limit exceeded" in err.value.details()
    assert upstream.calls == 3  # max_attempts


async def test_500_storm_beyond_the_budget_is_unavailable(upstream: FakeUpstream) -> None:
    upstream.default = upstream.error(500, "InternalError", "An internal error has occured, please try again later.")
    before = metric("captioner_upstream_retries_total", backend=upstream.protocol)
    failures_before = metric("captioner_captions_total", backend=upstream.protocol, outcome="unavailable")
    async with serve(remote_settings(upstream)) as s:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.stub.Caption(caption_request(png_bytes()), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "HTTP 500" in err.value.details() and "after 3 attempts" in err.value.details()
        assert upstream.calls == 3
        assert metric("captioner_upstream_retries_total", backend=upstream.protocol) == before + 2
        assert (
            metric("captioner_captions_total", backend=upstream.protocol, outcome="unavailable") == failures_before + 1
        )
        # The server keeps serving once the upstream recovers.
        upstream.default = None
        ok = await s.stub.Caption(caption_request(png_bytes()), timeout=10)
        assert ok.caption.description


async def test_callers_grpc_retries_do_not_multiply_ours(upstream: FakeUpstream) -> None:
    """Search calls the captioner over a channel whose retry policy retries UNAVAILABLE
    4 times. After the captioner spent its own 3 attempts, its reply carries gRPC server
    pushback, so the upstream sees 3 calls, not 4 x 3."""
    upstream.default = upstream.error(500, "InternalError", "An internal error has occured, please try again later.")
    async with serve(remote_settings(upstream)) as s:
        async with create_channel(s.running.address, retry_attempts=4) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await captioner_pb2_grpc.CaptionerStub(channel).Caption(caption_request(png_bytes()), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert ("grpc-retry-pushback-ms", "-1") in tuple(err.value.trailing_metadata() or ())
        assert upstream.calls == 3, "the caller's retry policy must not re-run an exhausted upstream call"


async def test_retry_time_budget_bounds_a_storm(upstream: FakeUpstream) -> None:
    upstream.default = upstream.error(503, "ServiceUnavailable", "busy")
    retry = RetrySettings(max_attempts=1000, initial_backoff_s=0.05, max_backoff_s=0.1, budget_s=0.5)
    async with serve(remote_settings(upstream, retry=retry)) as s:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.stub.Caption(caption_request(png_bytes()), timeout=10)
        elapsed = loop.time() - start
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert elapsed < 2.0
    assert 2 <= upstream.calls < 100


@pytest.mark.parametrize(
    "body",
    ["<html><body>502 Bad Gateway</body></html>", '{"output": {"choices": []}}', '{"choices": "nope", "output": null}'],
    ids=["html", "no-choices", "wrong-shape"],
)
async def test_malformed_body_is_unavailable_and_not_retried(upstream: FakeUpstream, body: str) -> None:
    upstream.default = Reply(200, body, content_type="text/html" if body.startswith("<") else "application/json")
    async with serve(remote_settings(upstream)) as s:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.stub.Caption(caption_request(png_bytes()), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "malformed" in err.value.details()
    assert upstream.calls == 1


async def test_slow_upstream_past_the_request_timeout_is_deadline_exceeded(upstream: FakeUpstream) -> None:
    upstream.default = Reply(200, upstream.ok().body, delay_s=5.0)
    retry = RetrySettings(max_attempts=2, initial_backoff_s=0.01, max_backoff_s=0.02, budget_s=5.0)
    async with serve(remote_settings(upstream, request_timeout_s=0.3, retry=retry)) as s:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.stub.Caption(caption_request(png_bytes()), timeout=10)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "did not answer in time after 2 attempts" in err.value.details()
    assert upstream.calls == 2


async def test_caller_deadline_bounds_the_upstream_call(upstream: FakeUpstream) -> None:
    upstream.default = Reply(200, upstream.ok().body, delay_s=5.0)
    async with serve(remote_settings(upstream, request_timeout_s=30.0)) as s:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.stub.Caption(caption_request(png_bytes()), timeout=0.6)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert loop.time() - start < 2.0
        # The server side gave up too: nothing is left in flight toward the upstream.
        for _ in range(50):
            if metric("captioner_upstream_inflight", backend=upstream.protocol) == 0:
                break
            await asyncio.sleep(0.02)
        assert metric("captioner_upstream_inflight", backend=upstream.protocol) == 0


@pytest.mark.parametrize(
    ("status", "code", "message"),
    [
        (400, "DataInspectionFailed", "Input data may contain inappropriate content."),
        (400, "InvalidParameter", "The image format is illegal and cannot be opened."),
    ],
)
async def test_rejected_content_is_invalid_argument_with_the_upstream_message(
    upstream: FakeUpstream, status: int, code: str, message: str
) -> None:
    upstream.default = upstream.error(status, code, message)
    async with serve(remote_settings(upstream)) as s:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.stub.Caption(caption_request(png_bytes()), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    assert upstream.calls == 1  # never retried


async def test_wrong_key_is_unavailable_and_the_key_is_not_echoed(upstream: FakeUpstream) -> None:
    async with serve(remote_settings(upstream, api_key="sk-wrong-key-0123456789")) as s:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.stub.Caption(caption_request(png_bytes()), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "credentials" in err.value.details()
    assert "sk-wrong-key" not in err.value.details()
    assert upstream.calls == 1


async def test_second_call_is_served_from_the_cache(upstream: FakeUpstream) -> None:
    image = png_bytes(40, 30)
    hits = metric("captioner_cache_hits_total")
    misses = metric("captioner_cache_misses_total")
    async with serve(remote_settings(upstream)) as s:
        first = await s.stub.Caption(caption_request(image), timeout=10)
        second = await s.stub.Caption(caption_request(image), timeout=10)
        other_prompt = await s.stub.Caption(caption_request(image, prompt="Describe briefly."), timeout=10)
    assert upstream.calls == 2  # the different prompt is a different cache entry
    assert not first.caption.cached and second.caption.cached and not other_prompt.caption.cached
    assert second.caption.description == first.caption.description
    assert list(second.caption.keywords) == list(first.caption.keywords)
    assert metric("captioner_cache_hits_total") == hits + 1
    assert metric("captioner_cache_misses_total") == misses + 2


async def test_cache_can_be_disabled(upstream: FakeUpstream) -> None:
    image = png_bytes(41, 30)
    async with serve(remote_settings(upstream, cache_size=0)) as s:
        await s.stub.Caption(caption_request(image), timeout=10)
        again = await s.stub.Caption(caption_request(image), timeout=10)
    assert upstream.calls == 2 and not again.caption.cached


async def test_concurrency_limit_toward_the_upstream(upstream: FakeUpstream) -> None:
    upstream.default = Reply(200, upstream.ok().body, delay_s=0.3)
    async with serve(remote_settings(upstream, max_concurrency=2, max_waiting=1, cache_size=0)) as s:
        calls = [s.stub.Caption(caption_request(png_bytes(10 + i, 10)), timeout=10) for i in range(4)]
        results = await asyncio.gather(*calls, return_exceptions=True)
    exhausted = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(exhausted) == 1 and exhausted[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "concurrency limit" in exhausted[0].details()
    assert upstream.calls == 3


async def test_large_images_are_downsized_before_upload(upstream: FakeUpstream) -> None:
    image = png_bytes(900, 300)
    async with serve(remote_settings(upstream, upload_max_side_px=256)) as s:
        await s.stub.Caption(caption_request(image), timeout=10)
    sent, _ = _sent_image_and_prompt(upstream)
    assert sent.startswith("data:image/jpeg;base64,")
    import io

    from PIL import Image

    uploaded = Image.open(io.BytesIO(base64.b64decode(sent.split(",", 1)[1])))
    assert max(uploaded.size) == 256


async def test_batch_mixes_results_and_item_errors(upstream: FakeUpstream) -> None:
    upstream.script.extend([upstream.ok(), upstream.ok()])
    request = captioner_pb2.CaptionBatchRequest(
        requests=[
            caption_request(png_bytes(20, 20)),
            caption_request(b"definitely not an image"),
            captioner_pb2.CaptionRequest(),
            caption_request(png_bytes(21, 20)),
        ]
    )
    async with serve(remote_settings(upstream)) as s:
        response = await s.stub.CaptionBatch(request, timeout=10)
    kinds = [r.WhichOneof("outcome") for r in response.results]
    assert kinds == ["caption", "error", "error", "caption"]
    assert response.results[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert response.results[1].error.message.startswith("item 1:")
    assert "image is missing" in response.results[2].error.message
    assert upstream.calls == 2


async def test_prompt_naming_a_local_file_is_refused(tmp_path: object) -> None:
    fake = FakeUpstream(protocol="dashscope", api_key=API_KEY).start()
    try:
        async with serve(remote_settings(fake)) as s:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await s.stub.Caption(caption_request(png_bytes(), prompt=__file__), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert fake.calls == 0  # the SDK never got to upload it
    finally:
        fake.stop()


async def test_api_key_never_appears_in_logs(
    upstream: FakeUpstream, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    upstream.script.extend(
        [
            upstream.error(500, "InternalError", f"echoing the key back: {API_KEY}"),
            upstream.ok(),
            upstream.error(400, "DataInspectionFailed", f"bad content for key {API_KEY}"),
        ]
    )
    async with serve(remote_settings(upstream)) as s:
        await s.stub.Caption(caption_request(png_bytes(30, 30)), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.stub.Caption(caption_request(png_bytes(31, 30)), timeout=10)
    out, errs = capfd.readouterr()
    assert API_KEY not in err.value.details() and "***" in err.value.details()
    assert API_KEY not in caplog.text
    assert API_KEY not in out and API_KEY not in errs
    sent = [v for r in upstream.requests for k, v in r.headers.items() if k.lower() == "authorization"]
    assert f"Bearer {API_KEY}" in sent  # it was really used
