"""CI smoke version of bench/load_search.py: the same driver, 20 clients x 3 s, against the
real suite on loopback. Only OK and RESOURCE_EXHAUSTED may come back; no timing is asserted.
A second search instance with tiny admission limits shows the backpressure is explicit:
overload is RESOURCE_EXHAUSTED at once, never a timeout or an internal error."""
from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from bench.load_search import drive, prepare, query_mix
from mmsearch.search.v1 import search_pb2_grpc
from services.common.server import RunningServer
from tests.conftest import MilvusLiteServer
from tests.reliability.helpers import start_captioner, start_embedder, start_search

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def suite(milvus_server: MilvusLiteServer) -> AsyncIterator[dict[str, RunningServer]]:
    embedder = await start_embedder()
    captioner = await start_captioner()
    search = await start_search(milvus_server.uri, embedder.address, captioner.address, collection="load")
    tight = await start_search(milvus_server.uri, embedder.address, captioner.address, collection="load",
                               max_concurrent_searches=2, max_waiting_searches=2)
    yield {"search": search, "tight": tight}
    for server in (tight, search, captioner, embedder):
        await server.stop(0.2)


async def test_load_smoke_only_explicit_backpressure(suite: dict[str, RunningServer]) -> None:
    async with grpc.aio.insecure_channel(suite["search"].address) as a, \
            grpc.aio.insecure_channel(suite["search"].address) as b:
        stubs = [search_pb2_grpc.SearchStub(a), search_pb2_grpc.SearchStub(b)]
        dimension, image = await prepare(stubs[0], 12)
        requests = query_mix(dimension, image, label="l1")
        result = await drive(stubs, requests, clients=20, seconds=3.0, deadline_s=30)
    print("\n", result.summary())
    assert result.codes["OK"] > 0
    assert not result.unexpected, (result.unexpected, result.errors)


async def test_overload_is_resource_exhausted_never_another_error(suite: dict[str, RunningServer]) -> None:
    async with grpc.aio.insecure_channel(suite["tight"].address) as channel:
        stub = search_pb2_grpc.SearchStub(channel)
        dimension, image = await prepare(stub, 4)
        result = await drive([stub], query_mix(dimension, image), clients=20, seconds=3.0, deadline_s=30,
                             backoff_s=0.0)
    print("\n", result.summary())
    assert result.codes["OK"] > 0 and result.codes["RESOURCE_EXHAUSTED"] > 0
    assert not result.unexpected, (result.unexpected, result.errors)
