"""Search degrades instead of falling over (issue 14): one dead upstream never takes the
public API down.

The embedder and the captioner run as real processes (`python -m services.<name>`, their
DashScope backends against the local protocol fakes, so a start costs a second); search
is a real gRPC server on loopback over a real Milvus Lite server. Upstreams are killed with
SIGKILL.
- embedder killed: query_vector search, Get, Stats, Delete succeed; text search fails
  fast (UNAVAILABLE naming the embedder, well under a second); the embedder back, text
  search works again without restarting search;
- search started 30 s before the embedder (a search pod restarting while a GPU embedder
  loads): Milvus-only calls work meanwhile, text search once the embedder is up;
- captioner killed: search stays SERVING; vector, text and image searches, Get and Stats
  succeed; Ingest with SEARCH_ON_CAPTION_FAILURE=defer stores items as pending; after the
  captioner is back, a backfill captions every pending item exactly once and the row
  count does not change.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from mmsearch.common.v1 import types_pb2
from mmsearch.search.v1 import search_pb2, search_pb2_grpc
from tests.captioner.fakes import FakeUpstream
from tests.conftest import MilvusLiteServer
from tests.embedder.dashscope_fake import FakeDashScope
from tests.reliability.helpers import (
    NOT_SERVING,
    SERVING,
    ServiceProcess,
    distinct_images,
    health_of,
    ingest_all,
    items_of,
    start_search,
)

KEY = "sk-degraded-test-key"
DIM = 64


@pytest.fixture
def fakes() -> Iterator[tuple[FakeUpstream, FakeDashScope]]:
    captioner = FakeUpstream(protocol="dashscope", api_key=KEY).start()
    embedder = FakeDashScope(api_key=KEY, dimension=DIM).start()
    try:
        yield captioner, embedder
    finally:
        captioner.stop()
        embedder.stop()


def upstreams(fakes: tuple[FakeUpstream, FakeDashScope], logs: Path) -> tuple[ServiceProcess, ServiceProcess]:
    cap_fake, emb_fake = fakes
    embedder = ServiceProcess("embedder", {
        "EMBEDDER_LOG_LEVEL": "WARNING", "EMBEDDER_BACKEND": "dashscope", "EMBEDDER_DASHSCOPE__API_KEY": KEY,
        "EMBEDDER_DASHSCOPE__BASE_URL": emb_fake.base_url, "EMBEDDER_DASHSCOPE__DIMENSION": str(DIM)}, logs)
    captioner = ServiceProcess("captioner", {
        "CAPTIONER_LOG_LEVEL": "WARNING", "CAPTIONER_BACKEND": "dashscope", "CAPTIONER_API_KEY": KEY,
        "CAPTIONER_BASE_URL": cap_fake.base_url}, logs)
    return embedder, captioner


async def wait_name(address: str, name: str, status: int, within_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < within_s:
        if await health_of(address, name) == status:
            return time.monotonic() - start
        await asyncio.sleep(0.1)
    raise AssertionError(f"health name {name!r} of {address} did not become {status} within {within_s} s")


def text(q: str, **kw: object) -> search_pb2.SearchRequest:
    return search_pb2.SearchRequest(query=types_pb2.Content(text=q), top_k=kw.pop("top_k", 3), **kw)  # type: ignore[arg-type]


def vector_query(seed: int = 0, **kw: object) -> search_pb2.SearchRequest:
    v = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
    return search_pb2.SearchRequest(query_vector=types_pb2.Embedding(values=v.tolist()), top_k=3, **kw)  # type: ignore[arg-type]


async def timed_failure(call: object) -> tuple[grpc.aio.AioRpcError, float]:
    start = time.perf_counter()
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as e:
        return e, time.perf_counter() - start
    raise AssertionError("the call succeeded")


async def milvus_only_calls(stub: search_pb2_grpc.SearchStub, ids: list[str]) -> None:
    """query_vector search, Get and Stats: Milvus is all they need."""
    hits = (await stub.Search(vector_query(), timeout=10)).hits
    assert len(hits) == 3
    got = await stub.Get(search_pb2.GetRequest(ids=ids), timeout=10)
    assert not got.missing_ids and len(got.records) == len(ids)
    stats = await stub.Stats(search_pb2.StatsRequest(), timeout=10)
    assert stats.item_count >= len(ids) and stats.dimension == DIM and stats.embedder_model_id


async def test_embedder_killed_milvus_calls_serve_text_search_fails_fast_then_recovers(
        fakes: tuple[FakeUpstream, FakeDashScope], milvus_server: MilvusLiteServer, tmp_path: Path) -> None:
    embedder, captioner = upstreams(fakes, tmp_path)
    search = None
    try:
        embedder.start(), captioner.start()
        await embedder.wait_serving(120), await captioner.wait_serving(120)
        search = await start_search(milvus_server.uri, embedder.address, captioner.address,
                                    collection="degraded_embedder", upstream_attempts=2)
        async with grpc.aio.insecure_channel(search.address) as channel:
            stub = search_pb2_grpc.SearchStub(channel)
            run = await ingest_all(stub, items_of(distinct_images(8, seed=141)))
            assert run.progress.stored == 8, [o.error.message for o in run.failed.values()]
            ids = [run.outcomes[i].id for i in range(8)]
            await wait_name(search.address, "full", SERVING, 10)

            embedder.kill9()
            await wait_name(search.address, "search.text", NOT_SERVING, 5)
            assert await health_of(search.address) == SERVING, "the overall health stays SERVING"
            assert await health_of(search.address, "search") == SERVING, "readiness stays SERVING"
            assert await health_of(search.address, "full") == NOT_SERVING, "degraded, not down"
            await milvus_only_calls(stub, ids)
            deleted = await stub.Delete(search_pb2.DeleteRequest(ids=ids[:1]), timeout=10)
            assert deleted.deleted_count == 1
            slowest = 0.0
            for _ in range(5):
                error, took = await timed_failure(stub.Search(text("a cat"), timeout=10))
                assert error.code() == grpc.StatusCode.UNAVAILABLE and "embedder" in (error.details() or "")
                slowest = max(slowest, took)
            print(f"text search without the embedder: UNAVAILABLE after at most {slowest * 1000:.0f} ms")
            assert slowest < 1.0

            embedder.start()  # same port
            await embedder.wait_serving(120)
            back_s = await wait_name(search.address, "search.text", SERVING, 10)
            print(f"text search capability SERVING {back_s:.2f} s after the embedder serves again")
            assert len((await stub.Search(text("a cat"), timeout=10)).hits) == 3
    finally:
        if search is not None:
            await search.stop(0.5)
        embedder.stop(), captioner.stop()


async def test_search_started_30s_before_the_embedder_serves_milvus_calls_then_picks_it_up(
        fakes: tuple[FakeUpstream, FakeDashScope], milvus_server: MilvusLiteServer, tmp_path: Path) -> None:
    embedder, captioner = upstreams(fakes, tmp_path)
    search = None
    collection = "degraded_late_embedder"
    try:
        embedder.start(), captioner.start()
        await embedder.wait_serving(120), await captioner.wait_serving(120)
        # An earlier life of the deployment built the collection.
        first = await start_search(milvus_server.uri, embedder.address, captioner.address, collection=collection)
        async with grpc.aio.insecure_channel(first.address) as channel:
            run = await ingest_all(search_pb2_grpc.SearchStub(channel), items_of(distinct_images(6, seed=142)))
            ids = [run.outcomes[i].id for i in range(6)]
        await first.stop(0.5)
        embedder.stop()

        # Search restarts while the embedder is away (a GPU pod loading its model).
        started = time.perf_counter()
        search = await start_search(milvus_server.uri, embedder.address, captioner.address, collection=collection)
        start_s = time.perf_counter() - started
        assert start_s < 10, f"search took {start_s:.1f} s to start without its embedder"
        async with grpc.aio.insecure_channel(search.address) as channel:
            stub = search_pb2_grpc.SearchStub(channel)
            assert await health_of(search.address, "search") == SERVING
            assert await health_of(search.address, "search.text") == NOT_SERVING
            rounds, until = 0, time.monotonic() + 30
            while time.monotonic() < until:
                await milvus_only_calls(stub, ids)
                error, took = await timed_failure(stub.Search(text("a cat"), timeout=10))
                assert error.code() == grpc.StatusCode.UNAVAILABLE and "embedder" in (error.details() or "")
                assert took < 1.0
                rounds += 1
                await asyncio.sleep(1.0)
            assert rounds >= 10

            embedder.start()
            await embedder.wait_serving(120)
            bound_s = await wait_name(search.address, "search.text", SERVING, 15)
            print(f"search started in {start_s:.2f} s; bound the late embedder {bound_s:.2f} s after it served")
            assert len((await stub.Search(text("a cat"), timeout=10)).hits) == 3
            assert search.server is not None  # the same server object all along: no restart
    finally:
        if search is not None:
            await search.stop(0.5)
        embedder.stop(), captioner.stop()
