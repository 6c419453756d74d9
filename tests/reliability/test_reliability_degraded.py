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
import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from typer.testing import CliRunner

from mmsearch.cli.main import app
from mmsearch.client import AsyncSearchClient
from mmsearch.common.v1 import types_pb2
from mmsearch.search.v1 import search_pb2, search_pb2_grpc
from tests.captioner.fakes import FakeUpstream
from tests.conftest import MilvusLiteServer
from tests.embedder.dashscope_fake import FakeDashScope
from tests.reliability.helpers import (
    NOT_SERVING,
    SERVING,
    ServiceProcess,
    dashscope_fakes,
    distinct_images,
    health_of,
    ingest_all,
    items_of,
    start_search,
)
from tests.search.conftest import create_legacy_collection

KEY = "sk-degraded-test-key"
runner = CliRunner()
DIM = 64


@pytest.fixture
def fakes() -> Iterator[tuple[FakeUpstream, FakeDashScope]]:
    with dashscope_fakes(KEY, DIM) as pair:
        yield pair


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
    kw.setdefault("top_k", 3)
    return search_pb2.SearchRequest(query_vector=types_pb2.Embedding(values=v.tolist()), **kw)  # type: ignore[arg-type]


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
        await embedder.wait_ready_async(120), await captioner.wait_ready_async(120)
        search = await start_search(milvus_server.uri, embedder.address, captioner.address,
                                    collection="degraded_embedder", upstream_attempts=2,
                                    max_concurrent_searches=2, max_waiting_searches=0)
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
            # Failing text searches hold no admission slot: with 2 slots and no waiting room,
            # 2 vector searches among 40 failing text searches still get theirs.
            calls = [stub.Search(text(f"q{i}"), timeout=10) for i in range(40)]
            calls += [stub.Search(vector_query(seed=i), timeout=10) for i in range(2)]
            results = await asyncio.gather(*calls, return_exceptions=True)
            assert all(isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.UNAVAILABLE
                       for r in results[:40])
            assert all(isinstance(r, search_pb2.SearchResponse) and len(r.hits) == 3 for r in results[40:]), results[40:]

            embedder.start()  # same port
            await embedder.wait_ready_async(120)
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
        await embedder.wait_ready_async(120), await captioner.wait_ready_async(120)
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
            await embedder.wait_ready_async(120)
            bound_s = await wait_name(search.address, "search.text", SERVING, 15)
            print(f"search started in {start_s:.2f} s; bound the late embedder {bound_s:.2f} s after it served")
            assert len((await stub.Search(text("a cat"), timeout=10)).hits) == 3
            assert search.server is not None  # the same server object all along: no restart
    finally:
        if search is not None:
            await search.stop(0.5)
        embedder.stop(), captioner.stop()


async def backfill(stub: search_pb2_grpc.SearchStub, **kw: object) -> tuple[
        dict[str, search_pb2.BackfillOutcome], search_pb2.BackfillProgress]:
    outcomes: dict[str, search_pb2.BackfillOutcome] = {}
    progress = search_pb2.BackfillProgress()
    async for reply in stub.Backfill(search_pb2.BackfillRequest(**kw), timeout=120):  # type: ignore[arg-type]
        for o in reply.outcomes:
            assert o.id not in outcomes, f"{o.id} got two outcomes"
            outcomes[o.id] = o
        progress = reply.progress
    return outcomes, progress


async def test_captioner_killed_search_serves_ingest_defers_then_backfill_captions_each_once(
        fakes: tuple[FakeUpstream, FakeDashScope], milvus_server: MilvusLiteServer, tmp_path: Path) -> None:
    cap_fake = fakes[0]
    embedder, captioner = upstreams(fakes, tmp_path)
    search = None
    try:
        embedder.start(), captioner.start()
        await embedder.wait_ready_async(120), await captioner.wait_ready_async(120)
        search = await start_search(milvus_server.uri, embedder.address, captioner.address,
                                    collection="degraded_captioner", upstream_attempts=2, upstream_timeout_s=10,
                                    on_caption_failure="defer", pending_images_dir=tmp_path / "pending")
        async with grpc.aio.insecure_channel(search.address) as channel:
            stub = search_pb2_grpc.SearchStub(channel)
            first = await ingest_all(stub, items_of(distinct_images(6, seed=143)))
            assert first.progress.stored == 6
            ids = [first.outcomes[i].id for i in range(6)]

            captioner.kill9()
            await wait_name(search.address, "ingest.caption", NOT_SERVING, 5)
            for name in ("", "search", "search.text", "ingest"):
                assert await health_of(search.address, name) == SERVING, name
            await milvus_only_calls(stub, ids)
            assert len((await stub.Search(text("a cat"), timeout=10)).hits) == 3
            image = distinct_images(6, seed=143)[2]
            by_image = await stub.Search(search_pb2.SearchRequest(
                query=types_pb2.Content(image=types_pb2.Image(data=image)), top_k=1), timeout=10)
            assert by_image.hits[0].id == ids[2]

            # Ingest defers: stored with the image vector, no caption, a pending mark.
            late_images = distinct_images(10, seed=144)
            late = await ingest_all(stub, items_of(late_images))
            deferred = late.with_status(search_pb2.ITEM_STATUS_DEFERRED)
            assert len(deferred) == 10 and late.progress.deferred == 10, late.progress
            for o in deferred.values():
                assert "caption failed" in o.error.message and "captioner" in o.error.message
            late_ids = [late.outcomes[i].id for i in range(10)]
            # With a caller-supplied caption Ingest needs only the embedder and Milvus.
            given = await ingest_all(stub, items_of(distinct_images(1, seed=146), caption=search_pb2.CaptionInput(
                description="a given caption", keywords=["given"])))
            assert given.progress.stored == 1, given.progress
            await stub.Delete(search_pb2.DeleteRequest(ids=[given.outcomes[0].id]), timeout=10)
            got = await stub.Get(search_pb2.GetRequest(ids=late_ids), timeout=10)
            assert all(r.caption_pending and not r.caption for r in got.records) and len(got.records) == 10
            # Searchable by image at once; never in caption searches (no made-up caption vector).
            hit = (await stub.Search(search_pb2.SearchRequest(
                query=types_pb2.Content(image=types_pb2.Image(data=late_images[4])), top_k=1), timeout=10)).hits[0]
            assert hit.id == late_ids[4] and hit.caption_pending
            caption_hits = (await stub.Search(text("a cat", top_k=50, target=search_pb2.TARGET_CAPTION))).hits
            assert {h.id for h in caption_hits} == set(ids), "caption searches skip pending items"
            pending_only = await stub.Search(vector_query(top_k=50, filter="caption_pending == true"), timeout=10)
            assert {h.id for h in pending_only.hits} == set(late_ids), "caption_pending is filterable"
            hybrid = await stub.Search(text("a cat", top_k=50, target=search_pb2.TARGET_HYBRID,
                                            filter="caption_pending == true"), timeout=10)
            assert {h.id for h in hybrid.hits} <= set(late_ids)  # through the image leg only
            stats = await stub.Stats(search_pb2.StatsRequest(), timeout=10)
            assert stats.item_count == 16 and stats.caption_pending_count == 10

            # One backfill at a time per server: a second one meanwhile is ABORTED.
            slow = asyncio.ensure_future(backfill(stub, max_items=2, max_items_per_s=1))
            await asyncio.sleep(0.5)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await backfill(stub)
            assert err.value.code() == grpc.StatusCode.ABORTED and "already running" in (err.value.details() or "")
            await slow
            # A backfill while the captioner is still down: every item reported, none lost.
            down, progress = await backfill(stub, max_items=3)
            assert progress.total == 3 and progress.failed == 3 and len(down) == 3
            assert all(o.status == search_pb2.BACKFILL_STATUS_FAILED for o in down.values())

            captioner.start()
            await captioner.wait_ready_async(120)
            await wait_name(search.address, "ingest.caption", SERVING, 10)
            calls_before = cap_fake.calls
            part, progress = await backfill(stub, max_items=4)  # interrupted after 4 ...
            assert progress.captioned == 4 and len(part) == 4
            # ... and resumed from the CLI (`mmsearch backfill`, its own client and channel).
            cli = await asyncio.to_thread(
                runner.invoke, app, ["--address", search.address, "backfill", "--rate", "50", "--json"])
            assert cli.exit_code == 0, cli.output
            # (this process' own search server logs to the same captured stdout: skip its lines)
            report = json.loads(cli.stdout[cli.stdout.index("{\n"):])
            assert report["progress"]["total"] == 6 and report["progress"]["captioned"] == 6, report
            rest = {o["id"] for o in report["outcomes"]}
            assert len(rest) == 6 and not rest & set(part)
            assert cap_fake.calls - calls_before == 10, "every pending item captioned exactly once"
            async with AsyncSearchClient(search.address) as client:  # the asyncio client's backfill
                updates = [u async for u in client.backfill()]
            assert updates[-1].progress.total == 0 and not any(u.outcomes for u in updates), "nothing left"
            cli = await asyncio.to_thread(runner.invoke, app, ["--address", search.address, "backfill"])
            assert cli.exit_code == 0 and "0 captioned" in cli.stdout and "of 0 pending items" in cli.stdout
            stats = await stub.Stats(search_pb2.StatsRequest(), timeout=10)
            assert stats.item_count == 16 and stats.caption_pending_count == 0, "row count unchanged"
            got = await stub.Get(search_pb2.GetRequest(ids=late_ids), timeout=10)
            assert all(not r.caption_pending and r.caption and r.captioner_model_id for r in got.records)
            caption_hits = (await stub.Search(text("a cat", top_k=50, target=search_pb2.TARGET_CAPTION))).hits
            assert {h.id for h in caption_hits} == set(ids) | set(late_ids)
            # The backfilled rows are what a normal ingest stores: re-ingesting is "unchanged".
            rerun = await ingest_all(stub, items_of(late_images))
            assert rerun.progress.unchanged == 10, rerun.progress
            assert not list((tmp_path / "pending").iterdir()), "kept images are removed once captioned"
    finally:
        if search is not None:
            await search.stop(0.5)
        embedder.stop(), captioner.stop()


async def test_a_collection_made_before_deferred_captions_keeps_working(
        fakes: tuple[FakeUpstream, FakeDashScope], milvus_server: MilvusLiteServer, tmp_path: Path) -> None:
    """No caption_pending field: everything works as before, rows read as not pending, and
    `defer` falls back to `fail` (nothing can be marked pending there)."""
    create_legacy_collection(milvus_server.uri, "pre_deferral", "dashscope:multimodal-embedding-v1", DIM)
    embedder, captioner = upstreams(fakes, tmp_path)
    search = None
    try:
        embedder.start(), captioner.start()
        await embedder.wait_ready_async(120), await captioner.wait_ready_async(120)
        search = await start_search(milvus_server.uri, embedder.address, captioner.address,
                                    collection="pre_deferral", on_caption_failure="defer", upstream_attempts=2)
        async with grpc.aio.insecure_channel(search.address) as channel:
            stub = search_pb2_grpc.SearchStub(channel)
            run = await ingest_all(stub, items_of(distinct_images(4, seed=147)))
            assert run.progress.stored == 4, [o.error.message for o in run.failed.values()]
            ids = [run.outcomes[i].id for i in range(4)]
            got = await stub.Get(search_pb2.GetRequest(ids=ids), timeout=10)
            assert len(got.records) == 4 and not any(r.caption_pending for r in got.records)
            for target in (search_pb2.TARGET_IMAGE, search_pb2.TARGET_CAPTION, search_pb2.TARGET_HYBRID):
                assert len((await stub.Search(text("a cat", target=target), timeout=10)).hits) == 3
            stats = await stub.Stats(search_pb2.StatsRequest(), timeout=10)
            assert stats.item_count == 4 and stats.caption_pending_count == 0
            captioner.kill9()
            await wait_name(search.address, "ingest.caption", NOT_SERVING, 5)
            late = await ingest_all(stub, items_of(distinct_images(2, seed=148)))
            assert late.progress.failed == 2 and late.progress.deferred == 0, late.progress
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await backfill(stub)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "predates deferred captions" in (err.value.details() or "")
    finally:
        if search is not None:
            await search.stop(0.5)
        embedder.stop(), captioner.stop()
