"""Search service under trouble: embedded Milvus Lite file, model guard, an embedder that
dies mid-ingest, Milvus restarts — nothing lost, nothing duplicated, health recovers."""
from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mmsearch.common.v1 import types_pb2
from mmsearch.search.v1 import search_pb2, search_pb2_grpc
from services.common.server import RunningServer, start_server
from services.search.milvus_store import MilvusStore
from services.search.settings import SearchSettings
from tests.conftest import MilvusLiteServer
from tests.search.conftest import Photo, ingest, start_captioner, start_embedder, start_search, text_query

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def captioner() -> AsyncIterator[RunningServer]:
    server = await start_captioner()
    yield server
    await server.stop(0.5)


async def health(server: RunningServer, name: str = "") -> int:
    async with grpc.aio.insecure_channel(server.address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=name), timeout=2)
        return reply.status


async def wait_name(server: RunningServer, name: str, status: int, within_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < within_s:
        if await health(server, name) == status:
            return time.monotonic() - start
        await asyncio.sleep(0.1)
    raise AssertionError(f"health {name!r} did not become {status} within {within_s} s")


async def wait_health(server: RunningServer, status: int, within_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < within_s:
        if await health(server) == status:
            return time.monotonic() - start
        await asyncio.sleep(0.1)
    raise AssertionError(f"health did not become {status} within {within_s} s")


async def test_embedded_milvus_lite_file_with_file_uris(captioner: RunningServer, photos: dict[str, Photo],
                                                        tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for name in ("cat", "coffee", "rocket"):
        (images / f"{name}.jpg").write_bytes(photos[name].data)
    embedder = await start_embedder()
    search = await start_search(str(tmp_path / "milvus" / "lite.db"), embedder.address, captioner.address,
                                file_root=images)
    try:
        async with grpc.aio.insecure_channel(search.address) as channel:
            stub = search_pb2_grpc.SearchStub(channel)
            batch = [search_pb2.IngestItem(image=types_pb2.Image(uri=f"file://{images}/{n}.jpg"))
                     for n in ("cat", "coffee", "rocket")]
            batch.append(search_pb2.IngestItem(image=types_pb2.Image(uri=f"file://{images}/../../etc/passwd")))
            outcomes, progress = await ingest(stub, batch)
            assert progress.stored == 3 and progress.failed == 1
            assert "'..'" in outcomes[3].error.message
            hit = (await stub.Search(text_query("a cup of coffee", top_k=1))).hits[0]
            assert hit.uri == f"file://{images}/coffee.jpg"
            by_uri = await stub.Search(search_pb2.SearchRequest(
                query=types_pb2.Content(image=types_pb2.Image(uri=f"file://{images}/rocket.jpg")), top_k=1))
            assert by_uri.hits[0].uri.endswith("rocket.jpg")
            stats = await stub.Stats(search_pb2.StatsRequest())
            assert stats.milvus_mode == "embedded" and stats.item_count == 3 and stats.index_type
    finally:
        await search.stop(0.5)
        await embedder.stop(0.5)


async def test_collection_built_by_another_model_is_a_clear_error_not_a_crash(captioner: RunningServer,
                                                                             tmp_path: Path) -> None:
    """The model guard keeps the embedder unbound (text search and ingest refused with the
    reason) while Milvus-only calls go on: a pod must not crash-loop over it."""
    uri = str(tmp_path / "guard.db")
    store = MilvusStore(SearchSettings(milvus_uri=uri, collection="guarded"))
    await store.ensure_collection("some-other-model", 512)
    await store.close()
    embedder = await start_embedder()
    search = await start_search(uri, embedder.address, captioner.address, collection="guarded",
                                embedder_start_wait_s=2)
    try:
        async with grpc.aio.insecure_channel(search.address) as channel:
            assert await health(search) == health_pb2.HealthCheckResponse.SERVING
            text_health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="search.text"), timeout=2)
            assert text_health.status == health_pb2.HealthCheckResponse.NOT_SERVING
            stub = search_pb2_grpc.SearchStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Search(text_query("a cat"))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert re.search("was built by embedding model 'some-other-model'.*SEARCH_MODEL_EMBEDDERS.*mmsearch index create", err.value.details())
            stats = await stub.Stats(search_pb2.StatsRequest())
            assert stats.embedder_model_id == "some-other-model" and stats.dimension == 512
    finally:
        await search.stop(0.5)
        await embedder.stop(0.5)


async def test_embedder_killed_mid_ingest_then_rerun_stores_each_item_once(
        captioner: RunningServer, milvus_server: MilvusLiteServer, photos: dict[str, Photo]) -> None:
    embedder = await start_embedder()
    port = embedder.port
    search = await start_search(milvus_server.uri, embedder.address, captioner.address, collection="killed",
                                upstream_attempts=2, embed_batch_items=2)
    items = [search_pb2.IngestItem(image=types_pb2.Image(data=p.data), metadata_json=json.dumps({"name": p.name}))
             for p in photos.values()]
    first_done = asyncio.Event()
    try:
        async with grpc.aio.insecure_channel(search.address) as channel:
            stub = search_pb2_grpc.SearchStub(channel)

            async def requests() -> AsyncIterator[search_pb2.IngestRequest]:
                yield search_pb2.IngestRequest(items=items[:4])
                await first_done.wait()
                await embedder.stop(0)  # the embedder goes away mid-ingest
                for i in range(4, len(items), 4):
                    yield search_pb2.IngestRequest(items=items[i : i + 4])

            outcomes: dict[int, search_pb2.ItemOutcome] = {}
            async for reply in stub.Ingest(requests()):
                for o in reply.outcomes:
                    outcomes[o.index] = o
                if len(outcomes) >= 4:
                    first_done.set()
            assert sorted(outcomes) == list(range(len(items))), "every item gets an outcome"
            failed = [o for o in outcomes.values() if o.status == search_pb2.ITEM_STATUS_FAILED]
            stored = [o for o in outcomes.values() if o.status == search_pb2.ITEM_STATUS_STORED]
            assert len(stored) >= 4 and len(failed) == len(items) - len(stored) > 0
            for o in failed:
                assert o.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
                assert "embedding failed" in o.error.message and "embedder" in o.error.message
            # The "search.text" / "ingest" capabilities follow the upstream: NOT_SERVING while
            # it is down; the overall health (Milvus) stays SERVING.
            await wait_name(search, "ingest", health_pb2.HealthCheckResponse.NOT_SERVING, 5)
            assert await health(search) == health_pb2.HealthCheckResponse.SERVING

            from services.embedder.app import create_app
            from services.embedder.settings import EmbedderSettings

            settings = EmbedderSettings(host="127.0.0.1", grpc_port=port, metrics_port=-1)
            embedder = await start_server(settings, create_app(settings))
            recovered_s = await wait_name(search, "ingest", health_pb2.HealthCheckResponse.SERVING, 10)
            assert recovered_s < 10

            again, progress = await ingest(stub, items)
            assert progress.failed == 0
            assert progress.stored == len(failed) and progress.unchanged == len(stored)
            stats = await stub.Stats(search_pb2.StatsRequest())
            assert stats.item_count == len(items), "each item stored exactly once"
    finally:
        await search.stop(0.5)
        await embedder.stop(0.5)


async def test_milvus_restart_is_survived_without_restarting_search(
        captioner: RunningServer, photos: dict[str, Photo], tmp_path: Path) -> None:
    milvus = MilvusLiteServer(str(tmp_path / "milvus-data"))
    milvus.start()
    embedder = await start_embedder()
    search = await start_search(milvus.uri, embedder.address, captioner.address, collection="restarts",
                                milvus_timeout_s=3)
    try:
        async with grpc.aio.insecure_channel(search.address) as channel:
            stub = search_pb2_grpc.SearchStub(channel)
            await ingest(stub, [search_pb2.IngestItem(image=types_pb2.Image(data=photos[n].data)) for n in ("cat", "coffee")])
            milvus.kill9()
            await wait_health(search, health_pb2.HealthCheckResponse.NOT_SERVING, 10)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Search(text_query("a cat"))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            milvus.start()  # same port, same data; returns once Milvus listens again
            # The promise to operators: back by itself within 5 s of Milvus being back.
            recovered_s = await wait_health(search, health_pb2.HealthCheckResponse.SERVING, 5)
            print(f"search SERVING {recovered_s:.2f} s after Milvus listens again")
            reply = await stub.Search(text_query("a cat", top_k=2))
            assert len(reply.hits) == 2
    finally:
        await search.stop(0.5)
        await embedder.stop(0.5)
        milvus.stop()
