"""The shared upstream kit (services/common/upstream.py) against a real local HTTP server.

The server answers from a script (status, body, delay) so every failure mode an upstream
model API has is spoken over real sockets: 429, 5xx, 4xx rejections, slow answers, an API
key echoed back in an error message.
"""
from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import aiohttp
import numpy as np
import pytest
from PIL import Image

from services.common.deadline import NO_DEADLINE, Deadline
from services.common.errors import DeadlineExceeded, InvalidInput, Overloaded, UpstreamExhausted
from services.common.images import decode_image
from services.common.settings import ImageLimits, RetrySettings
from services.common.upstream import (
    DASHSCOPE_EMBEDDING_FORMATS,
    UpstreamCaller,
    UpstreamError,
    UpstreamObserver,
    dashscope_kind,
    kind_for_status,
    reencode_for_upload,
    scrub,
)

KEY = "sk-kit-test-0123456789abcdef"
FAST = RetrySettings(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02, budget_s=5.0)


class Scripted:
    """HTTP server on 127.0.0.1: each POST takes the next scripted (status, body, delay)."""

    def __init__(self) -> None:
        self.script: deque[tuple[int, dict[str, Any], float]] = deque()
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with outer.lock:
                    outer.requests += 1
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                    status, body, delay = outer.script.popleft() if outer.script else (200, {"ok": True}, 0.0)
                try:
                    time.sleep(delay)
                    raw = json.dumps(body).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                except OSError:
                    pass  # the client gave up
                finally:
                    with outer.lock:
                        outer.in_flight -= 1

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1/call"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[Scripted]:
    s = Scripted()
    yield s
    s.stop()


class Counting(UpstreamObserver):
    def __init__(self) -> None:
        self.outcomes: list[str] = []
        self.retries = 0
        self.seconds = 0
        self.inflight_now = 0
        self.waiting_now = 0

    def attempt_outcome(self, error: UpstreamError | None) -> None:
        self.outcomes.append("ok" if error is None else error.kind)

    def attempt_seconds(self, seconds: float) -> None:
        self.seconds += 1

    def retrying(self, error: BaseException | None) -> None:
        self.retries += 1

    def inflight(self, delta: int) -> None:
        self.inflight_now += delta

    def waiting(self, delta: int) -> None:
        self.waiting_now += delta


async def post(url: str, timeout_s: float) -> dict[str, Any]:
    """One attempt, the way a backend writes it: protocol only, classified errors."""
    try:
        async with aiohttp.ClientSession() as session, session.post(
            url, json={"input": "x"}, headers={"Authorization": f"Bearer {KEY}"},
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as response:
            body = await response.json()
            if response.status != 200:
                raise UpstreamError(kind_for_status(response.status), body.get("message", ""),
                                    status=response.status, code=body.get("code"))
            return body
    except TimeoutError:
        raise UpstreamError("timeout", f"no answer within {timeout_s:.1f}s") from None
    except aiohttp.ClientConnectionError as e:
        raise UpstreamError("connection", str(e)) from None


def caller(retry: RetrySettings = FAST, **kw: Any) -> tuple[UpstreamCaller, Counting]:
    observer = Counting()
    kw.setdefault("max_concurrency", 4)
    kw.setdefault("request_timeout_s", 5.0)
    return UpstreamCaller("testapi", retry, secrets=[KEY], observer=observer, **kw), observer


async def test_throttling_and_5xx_are_retried_then_succeed(server: Scripted) -> None:
    server.script.extend([(429, {"message": "slow down"}, 0.0), (503, {"message": "busy"}, 0.0)])
    up, seen = caller()
    assert await up.call(lambda t: post(server.url, t), NO_DEADLINE) == {"ok": True}
    assert server.requests == 3
    assert seen.outcomes == ["rate_limited", "server", "ok"] and seen.retries == 2 and seen.seconds == 3
    assert seen.inflight_now == 0 and seen.waiting_now == 0


async def test_a_5xx_storm_ends_after_max_attempts_with_pushback(server: Scripted) -> None:
    server.script.extend([(500, {"code": "InternalError", "message": "boom"}, 0.0)] * 5)
    up, seen = caller()
    with pytest.raises(UpstreamExhausted) as caught:
        await up.call(lambda t: post(server.url, t), Deadline.after(10))
    assert server.requests == 3 and seen.retries == 2
    assert caught.value.no_retry
    assert "testapi is unavailable after 3 attempts: HTTP 500 InternalError: boom" == caught.value.message


async def test_throttling_past_the_retries_is_overloaded(server: Scripted) -> None:
    server.script.extend([(429, {"message": "rate limit exceeded"}, 0.0)] * 3)
    up, _ = caller()
    with pytest.raises(Overloaded, match="rate limiting us after 3 attempts: HTTP 429: rate limit exceeded"):
        await up.call(lambda t: post(server.url, t), NO_DEADLINE)
    assert server.requests == 3


async def test_a_rejection_is_invalid_input_and_never_retried(server: Scripted) -> None:
    server.script.append((400, {"message": "bad image"}, 0.0))
    up, seen = caller()
    with pytest.raises(InvalidInput, match="testapi rejected the request: HTTP 400: bad image"):
        await up.call(lambda t: post(server.url, t), NO_DEADLINE)
    assert server.requests == 1 and seen.retries == 0


async def test_retries_can_be_switched_off(server: Scripted) -> None:
    server.script.append((503, {"message": "busy"}, 0.0))
    up, _ = caller()
    with pytest.raises(UpstreamExhausted, match="after 1 attempt:"):
        await up.call(lambda t: post(server.url, t), NO_DEADLINE, retries=False)
    assert server.requests == 1


async def test_the_api_key_is_scrubbed_from_errors_and_logs(
    server: Scripted, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    server.script.extend([(500, {"message": f"backend saw key {KEY}"}, 0.0)] * 3)
    up, _ = caller()
    with pytest.raises(UpstreamExhausted) as caught:
        await up.call(lambda t: post(server.url, t), NO_DEADLINE)
    out, err = capfd.readouterr()
    assert KEY not in caught.value.message and "backend saw key ***" in caught.value.message
    assert "testapi call failed; retrying" in caplog.text + out + err
    assert KEY not in caplog.text + out + err


async def test_the_time_budget_bounds_the_retries(server: Scripted) -> None:
    server.script.extend([(503, {"message": "busy"}, 0.0)] * 1000)
    up, _ = caller(RetrySettings(max_attempts=1000, initial_backoff_s=0.05, max_backoff_s=0.1, budget_s=0.4))
    started = time.monotonic()
    with pytest.raises(UpstreamExhausted):
        await up.call(lambda t: post(server.url, t), NO_DEADLINE)
    assert time.monotonic() - started < 1.5
    assert 2 <= server.requests < 100


async def test_a_slow_upstream_ends_at_the_callers_deadline(server: Scripted) -> None:
    server.script.extend([(200, {"ok": True}, 3.0)] * 3)
    up, seen = caller()
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await up.call(lambda t: post(server.url, t), Deadline.after(0.4))
    assert time.monotonic() - started < 1.5
    assert seen.inflight_now == 0


async def test_each_attempt_times_out_at_request_timeout(server: Scripted) -> None:
    server.script.extend([(200, {"ok": True}, 2.0)] * 2)
    up, _ = caller(RetrySettings(max_attempts=2, initial_backoff_s=0.01, max_backoff_s=0.02, budget_s=5.0),
                   request_timeout_s=0.2)
    with pytest.raises(DeadlineExceeded, match="testapi did not answer in time after 2 attempts"):
        await up.call(lambda t: post(server.url, t), Deadline.after(10))
    assert server.requests == 2


async def test_an_expired_deadline_sends_nothing(server: Scripted) -> None:
    up, _ = caller()
    with pytest.raises(DeadlineExceeded):
        await up.call(lambda t: post(server.url, t), Deadline.after(-1))
    assert server.requests == 0


async def test_the_concurrency_limit_and_its_wait_line(server: Scripted) -> None:
    server.script.extend([(200, {"ok": True}, 0.3)] * 3)
    up, seen = caller(max_concurrency=1, max_waiting=1)
    calls = [asyncio.create_task(up.call(lambda t: post(server.url, t), NO_DEADLINE)) for _ in range(3)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    refused = [r for r in results if isinstance(r, Overloaded)]
    assert len(refused) == 1 and "concurrency limit" in refused[0].message
    assert [r for r in results if r == {"ok": True}] == [{"ok": True}] * 2
    assert server.max_in_flight == 1 and server.requests == 2
    assert seen.inflight_now == 0 and seen.waiting_now == 0


def test_classification() -> None:
    assert [kind_for_status(s) for s in (429, 408, 409, 500, 503, 401, 404, 400, 413)] == [
        "rate_limited", "timeout", "server", "server", "server", "auth", "auth", "rejected", "rejected"]
    assert dashscope_kind(400, "Throttling.RateQuota") == "rate_limited"
    assert dashscope_kind(400, "DataInspectionFailed") == "rejected"
    assert dashscope_kind(500, "InvalidApiKey") == "auth"
    assert dashscope_kind(400, "InternalError.Timeout") == "server"
    assert dashscope_kind(502, None) == "server"
    assert scrub(f"a\n  {KEY}  b", KEY, None) == "a *** b"
    assert len(scrub("x" * 2000)) == 501


def _encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_reencode_for_upload() -> None:
    small = _encode(Image.new("RGB", (40, 30), (200, 10, 10)), "JPEG")
    assert reencode_for_upload(decode_image(small, ImageLimits()), small, max_bytes=100_000) == (small, "image/jpeg")
    # Too large on the long side: a JPEG capped there.
    big_side = _encode(Image.new("RGB", (800, 400), (1, 2, 3)), "PNG")
    out, mime = reencode_for_upload(decode_image(big_side, ImageLimits()), big_side, max_bytes=10**6, max_side=256)
    assert mime == "image/jpeg" and Image.open(io.BytesIO(out)).size == (256, 128)
    # Too many bytes: quality, then size, until it fits.
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (900, 900, 3), dtype=np.uint8))
    data = _encode(noise, "PNG")
    out, mime = reencode_for_upload(decode_image(data, ImageLimits()), data, max_bytes=60_000)
    assert mime == "image/jpeg" and len(out) <= 60_000
    # A format the upstream does not take.
    webp = _encode(Image.new("RGB", (20, 20), (1, 2, 3)), "WEBP")
    decoded = decode_image(webp, ImageLimits())
    assert reencode_for_upload(decoded, webp, max_bytes=10**6) == (webp, "image/webp")
    assert reencode_for_upload(decoded, webp, max_bytes=10**6, formats=DASHSCOPE_EMBEDDING_FORMATS)[1] == "image/jpeg"
