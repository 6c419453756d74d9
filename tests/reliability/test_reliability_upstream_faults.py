"""Unreliable and slow upstreams behind the real services.

- The DashScope-protocol captioner upstream answers 429 to ~30% of calls and fails in 5xx
  bursts: the ingest accounts for every item, each caption stays within the retry budget
  (attempts and time), and the metrics count exactly what the upstream did.
- Slow upstreams: the caller's deadline propagates search -> captioner / embedder -> HTTP,
  so the caller gets DEADLINE_EXCEEDED on time and no work is left hanging server-side.

Search, captioner and embedder run in this process (their Prometheus series are read
from the default registry); the upstream HTTP APIs are the protocol fakes.
"""
from __future__ import annotations

import asyncio
import hashlib
import random
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
import pytest_asyncio
from prometheus_client import REGISTRY

from mmsearch.captioner.v1 import captioner_pb2, captioner_pb2_grpc
from mmsearch.common.v1 import types_pb2
from mmsearch.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from mmsearch.search.v1 import search_pb2, search_pb2_grpc
from services.common.retries import RetrySettings
from services.common.server import RunningServer
from tests.captioner.fakes import FakeUpstream, Reply
from tests.conftest import MilvusLiteServer
from tests.embedder.dashscope_fake import FakeDashScope
from tests.reliability.helpers import (
    distinct_images,
    ingest_all,
    items_of,
    start_captioner,
    start_embedder,
    start_search,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")
KEY = "sk-faults-test-key"
SEARCH_ATTEMPTS = 2
RETRY = RetrySettings(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05, budget_s=5.0)


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class FlakyUpstream(FakeUpstream):
    """DashScope's multimodal-generation protocol, unreliable on purpose (seeded):
    `throttle` of the calls get 429 Throttling, and every `burst_every` calls a burst of
    `burst_len` consecutive 5xx answers starts. `delay_s` makes every answer slow."""

    def __init__(self, **kw: Any) -> None:
        self.throttle = kw.pop("throttle", 0.0)
        self.burst_every = kw.pop("burst_every", 0)
        self.burst_len = kw.pop("burst_len", 0)
        self.delay_s = kw.pop("delay_s", 0.0)
        super().__init__(**kw)
        self.rng = random.Random(7)
        self.answered: Counter[int] = Counter()
        self.by_image: Counter[str] = Counter()
        self.n = 0
        self.burst_left = 0
        self.flaky_lock = threading.Lock()

    def _handle(self, path: str, headers: dict[str, str], body: Any) -> Reply:
        reply = super()._handle(path, headers, body)
        with self.flaky_lock:
            self.n += 1
            if reply.status == 200:
                image = body["input"]["messages"][0]["content"][0]["image"]
                self.by_image[hashlib.sha1(image.encode()).hexdigest()] += 1
                if self.burst_every and self.n % self.burst_every == 0:
                    self.burst_left = self.burst_len
                if self.burst_left > 0:
                    self.burst_left -= 1
                    status = self.rng.choice([500, 502, 503])
                    reply = self.error(status, "InternalError", "The service is temporarily unavailable.")
                elif self.rng.random() < self.throttle:
                    reply = self.error(429, "Throttling.RateQuota", "Requests rate limit exceeded.")
            self.answered[reply.status] += 1
        if self.delay_s:
            reply = Reply(reply.status, reply.body, self.delay_s, reply.content_type)
        return reply


class SlowDashScope(FakeDashScope):
    """The embedding protocol fake, answering after `delay_s` (released on stop)."""

    delay_s: float = 0.0
    release = threading.Event()

    def handle(self, path: str, headers: dict[str, str], raw: bytes) -> tuple[int, dict[str, Any]]:
        if self.delay_s:
            self.release.wait(self.delay_s)
        return super().handle(path, headers, raw)


@pytest.fixture(scope="module")
def caption_api() -> Iterator[FlakyUpstream]:
    fake = FlakyUpstream(protocol="dashscope", api_key=KEY).start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def embed_api() -> Iterator[SlowDashScope]:
    fake = SlowDashScope(api_key=KEY, dimension=32).start()
    yield fake
    fake.release.set()
    fake.stop()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def suite(caption_api: FlakyUpstream, embed_api: SlowDashScope,
                milvus_server: MilvusLiteServer) -> AsyncIterator[dict[str, RunningServer]]:
    from pydantic import SecretStr

    from services.embedder.settings import DashScopeSettings

    embedder = await start_embedder(backend="dashscope", dashscope=DashScopeSettings(
        api_key=SecretStr(KEY), base_url=embed_api.base_url, dimension=32, max_concurrent_calls=16,
        retry=RetrySettings(max_attempts=2, initial_backoff_s=0.01, max_backoff_s=0.05)))
    captioner = await start_captioner(backend="dashscope", api_key=SecretStr(KEY), base_url=caption_api.base_url,
                                      retry=RETRY, request_timeout_s=10, call_deadline_s=20, max_concurrency=8)
    search = await start_search(milvus_server.uri, embedder.address, captioner.address, collection="faults",
                                upstream_attempts=SEARCH_ATTEMPTS, caption_concurrency=8)
    yield {"embedder": embedder, "captioner": captioner, "search": search}
    for server in (search, captioner, embedder):
        await server.stop(0.2)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stub(suite: dict[str, RunningServer]) -> AsyncIterator[search_pb2_grpc.SearchStub]:
    async with grpc.aio.insecure_channel(suite["search"].address) as channel:
        yield search_pb2_grpc.SearchStub(channel)


async def test_throttling_and_5xx_bursts_every_item_accounted_for_within_the_retry_budget(
        caption_api: FlakyUpstream, stub: search_pb2_grpc.SearchStub) -> None:
    n = 200
    caption_api.throttle, caption_api.burst_every, caption_api.burst_len = 0.3, 40, 3
    caption_api.answered.clear()
    caption_api.by_image.clear()
    series = {
        "retries": ("captioner_upstream_retries_total", {"backend": "dashscope"}),
        "rate_limited": ("captioner_upstream_errors_total", {"backend": "dashscope", "kind": "rate_limited"}),
        "server": ("captioner_upstream_errors_total", {"backend": "dashscope", "kind": "server"}),
        "ok": ("captioner_captions_total", {"backend": "dashscope", "outcome": "ok"}),
        "exhausted": ("captioner_captions_total", {"backend": "dashscope", "outcome": "resource_exhausted"}),
        "unavailable": ("captioner_captions_total", {"backend": "dashscope", "outcome": "unavailable"}),
        "failed_items": ("search_ingest_items_total", {"outcome": "failed"}),
        "stored_items": ("search_ingest_items_total", {"outcome": "stored"}),
    }
    before = {k: metric(name, **labels) for k, (name, labels) in series.items()}
    items = items_of(distinct_images(n, seed=51))
    started = time.monotonic()
    runs = [await ingest_all(stub, items, timeout_s=300)]
    first = runs[0]
    assert sorted(first.outcomes) == list(range(n)), "every item gets exactly one outcome"
    for o in first.failed.values():
        assert o.error.code in (grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], grpc.StatusCode.UNAVAILABLE.value[0])
        assert o.error.message.startswith("caption failed: captioner:") and "dashscope" in o.error.message
    while runs[-1].failed and len(runs) < 6:  # what a client does: re-run the same ingest
        runs.append(await ingest_all(stub, items, timeout_s=300))
    elapsed = time.monotonic() - started
    assert not runs[-1].failed, f"still failing after {len(runs)} runs"
    assert sum(r.progress.stored for r in runs) == n, "each item stored exactly once over the runs"
    assert (await stub.Stats(search_pb2.StatsRequest())).item_count >= n

    after = {k: metric(name, **labels) - before[k] for k, (name, labels) in series.items()}
    calls = sum(caption_api.answered.values())
    captions = after["ok"] + after["exhausted"] + after["unavailable"]
    print(f"\n{n} items, {len(runs)} run(s), {elapsed:.1f} s: upstream answered {dict(caption_api.answered)}; "
          f"first run failed {len(first.failed)}; metrics {after}")
    # The upstream really was unreliable.
    assert caption_api.answered[429] >= 0.2 * calls and caption_api.answered[200] >= n
    assert sum(caption_api.answered[s] for s in (500, 502, 503)) >= 3
    # Retries stay within the budget: at most max_attempts HTTP attempts per Caption call,
    # and the layers do not multiply: search's gRPC retry policy (SEARCH_ATTEMPTS here)
    # honours the captioner's "no retry" pushback once the captioner's own attempts are
    # spent, so each item costs at most max_attempts upstream calls per run.
    assert calls <= RETRY.max_attempts * captions
    assert max(caption_api.by_image.values()) <= RETRY.max_attempts * len(runs)
    # ...and the metrics show exactly what happened upstream.
    assert after["ok"] == n
    assert after["retries"] == calls - captions
    assert after["rate_limited"] == caption_api.answered[429]
    assert after["server"] == sum(caption_api.answered[s] for s in (500, 502, 503))
    assert after["failed_items"] == sum(len(r.failed) for r in runs)
    assert after["stored_items"] == n
    caption_api.throttle, caption_api.burst_every = 0.0, 0


async def _wait(predicate: Any, within_s: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < within_s:
        if predicate():
            return time.monotonic() - start
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within {within_s} s: {what}")


def ended(service: str, method: str) -> float:
    """Server-side calls of `method` that ended because of a deadline or a cancellation."""
    return sum(metric("grpc_server_handled_total", grpc_type="unary", grpc_service=service, grpc_method=method,
                      grpc_code=code) for code in ("DeadlineExceeded", "Canceled"))


CAPTION = ("mmsearch.captioner.v1.Captioner", "Caption")
CAPTION_BATCH = ("mmsearch.captioner.v1.Captioner", "CaptionBatch")  # what the ingest pipeline sends
EMBED = ("mmsearch.embedder.v1.Embedder", "Embed")


async def test_slow_captioner_ingest_ends_at_the_deadline_everywhere(
        caption_api: FlakyUpstream, stub: search_pb2_grpc.SearchStub) -> None:
    caption_api.delay_s = 30.0  # far beyond the caller's deadline and below nothing
    deadline_s = 2.0
    captions_ended = ended(*CAPTION) + ended(*CAPTION_BATCH)
    in_flight_before = metric("search_ingest_in_flight_items")
    try:
        start = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ingest_all(stub, items_of(distinct_images(4, seed=52)), timeout_s=deadline_s)
        elapsed = time.monotonic() - start
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert elapsed < deadline_s + 1.0
        # Server side, every stage lets go at the deadline, not after the upstream's 30 s
        # (or the captioner's own 10 s request timeout): the captioner's calls end, its
        # HTTP attempts are no longer in flight, and search holds no item of the call.
        await _wait(lambda: ended(*CAPTION) + ended(*CAPTION_BATCH) > captions_ended, 1.5,
                    "the Caption(Batch) calls ended")
        await _wait(lambda: metric("captioner_upstream_inflight", backend="dashscope") == 0, 1.5,
                    "no upstream attempt in flight")
        await _wait(lambda: metric("search_ingest_in_flight_items") == in_flight_before, 1.5,
                    "search let go of the call's items")
    finally:
        caption_api.delay_s = 0.0
    run = await ingest_all(stub, items_of(distinct_images(2, seed=53)), timeout_s=30)
    assert not run.failed  # immediately usable again


async def test_slow_embedder_search_and_ingest_end_at_the_deadline_everywhere(
        embed_api: SlowDashScope, stub: search_pb2_grpc.SearchStub) -> None:
    embed_api.delay_s = 30.0
    deadline_s = 1.5
    try:
        for what in ("Search", "Ingest"):
            embeds_ended = ended(*EMBED)
            start = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                if what == "Search":
                    await stub.Search(search_pb2.SearchRequest(query=types_pb2.Content(text="slow"), top_k=3),
                                      timeout=deadline_s)
                else:
                    await ingest_all(stub, items_of(distinct_images(3, seed=54)), timeout_s=deadline_s)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, what
            assert time.monotonic() - start < deadline_s + 1.0, what
            await _wait(lambda n=embeds_ended: ended(*EMBED) > n, 1.5, f"{what}: the Embed call ended")
            await _wait(lambda: metric("embedder_queue_depth") == 0, 1.5, f"{what}: embedder queue empty")
    finally:
        embed_api.delay_s = 0.0
    start = time.monotonic()
    reply = await stub.Search(search_pb2.SearchRequest(query=types_pb2.Content(text="fast again"), top_k=3),
                              timeout=10)
    assert reply.hits and time.monotonic() - start < 5


# --- the deadline each upstream call carries ---------------------------------------------------


class Recorder(embedder_pb2_grpc.EmbedderServicer, captioner_pb2_grpc.CaptionerServicer):
    """Stands in for embedder and captioner and records the deadline each call arrived with."""

    def __init__(self) -> None:
        self.remaining: dict[str, list[float]] = {"Embed": [], "Caption": []}

    async def Info(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, embedder_pb2.InfoRequest):
            return embedder_pb2.InfoResponse(model_id="recorder", dimension=8, max_batch_items=64)
        return captioner_pb2.InfoResponse(model_id="recorder")

    async def Embed(self, request: embedder_pb2.EmbedRequest, context: grpc.aio.ServicerContext) -> Any:
        self.remaining["Embed"].append(context.time_remaining() or float("inf"))
        values = [[1.0 + i] + [0.5] * 7 for i in range(len(request.items))]
        return embedder_pb2.EmbedResponse(embeddings=[types_pb2.Embedding(values=v) for v in values],
                                          model_id="recorder", dimension=8)

    async def Caption(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.remaining["Caption"].append(context.time_remaining() or float("inf"))
        return captioner_pb2.CaptionResponse(caption=captioner_pb2.Caption(description="a thing", model_id="recorder"))

    async def CaptionBatch(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        # One entry per image: each image's caption was asked for with this deadline.
        self.remaining["Caption"] += [context.time_remaining() or float("inf")] * len(request.requests)
        caption = captioner_pb2.Caption(description="a thing", model_id="recorder")
        return captioner_pb2.CaptionBatchResponse(
            results=[captioner_pb2.CaptionResult(caption=caption) for _ in request.requests])


async def test_every_upstream_call_carries_the_callers_deadline(milvus_server: MilvusLiteServer) -> None:
    """gRPC does not pass a server's incoming deadline on to the calls it makes: search must.
    Its upstream timeout here is 60 s, so anything above the caller's deadline is a miss."""
    from services.common.server import GrpcApp, start_server
    from services.common.settings import ServerSettings

    recorder = Recorder()

    def register(server: grpc.aio.Server) -> None:
        embedder_pb2_grpc.add_EmbedderServicer_to_server(recorder, server)
        captioner_pb2_grpc.add_CaptionerServicer_to_server(recorder, server)

    settings = ServerSettings(host="127.0.0.1", grpc_port=0, metrics_port=-1)
    upstream = await start_server(settings, GrpcApp("recorder", ["mmsearch.embedder.v1.Embedder",
                                                                 "mmsearch.captioner.v1.Captioner"], register))
    search = await start_search(milvus_server.uri, upstream.address, upstream.address, collection="deadlines",
                                upstream_timeout_s=60)
    try:
        async with grpc.aio.insecure_channel(search.address) as channel:
            stub = search_pb2_grpc.SearchStub(channel)
            await stub.Search(search_pb2.SearchRequest(query=types_pb2.Content(text="x"), top_k=1), timeout=2.5)
            # (+0.1: the grpc-timeout header rounds up; a missed deadline would show the 60 s upstream timeout)
            assert recorder.remaining["Embed"] and 0 < recorder.remaining["Embed"][-1] <= 2.6
            run = await ingest_all(stub, items_of(distinct_images(3, seed=55)), timeout_s=4.0)
            assert not run.failed, run.failed
            assert len(recorder.remaining["Caption"]) == 3
            assert all(0 < r <= 4.1 for r in recorder.remaining["Caption"]), recorder.remaining
            assert all(0 < r <= 4.1 for r in recorder.remaining["Embed"][1:]), recorder.remaining
    finally:
        await search.stop(0.2)
        await upstream.stop(0.2)
