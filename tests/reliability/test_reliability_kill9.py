"""kill -9 of the embedder or the captioner process in the middle of a 1,000-image ingest.

The upstream runs as a real process (`python -m services.<name>`), is killed with SIGKILL
while items are in flight, and is restarted on the same port while the ingest call goes
on. Then:
- the first call gives every one of the 1,000 items exactly one outcome, and each failed
  item carries a reason (code + message naming the stage and the upstream);
- items sent after the upstream is back are stored: search recovered without a restart;
- re-running the same ingest stores exactly the failed items and reports the others
  unchanged: 1,000 rows in Milvus, 1,000 distinct ids, none duplicated.

The upstreams use their DashScope backends against local protocol fakes so 1,000 images
cost milliseconds each on a 2-core CI machine; RELIABILITY_KILL_BACKEND=lite runs the
same test on the offline models (minutes), RELIABILITY_KILL_ITEMS changes the count.
"""
from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from pymilvus import MilvusClient

from mmsearch.search.v1 import search_pb2, search_pb2_grpc
from tests.captioner.fakes import FakeUpstream
from tests.conftest import MilvusLiteServer
from tests.embedder.dashscope_fake import FakeDashScope
from tests.reliability.helpers import (
    SERVING,
    IngestRun,
    ServiceProcess,
    chunks,
    dashscope_fakes,
    distinct_images,
    ingest_all,
    items_of,
    start_search,
    wait_health,
)

N = int(os.environ.get("RELIABILITY_KILL_ITEMS", "1000"))
BACKEND = os.environ.get("RELIABILITY_KILL_BACKEND", "dashscope")
KEY = "sk-kill9-test-key"
UNAVAILABLE, DEADLINE = grpc.StatusCode.UNAVAILABLE.value[0], grpc.StatusCode.DEADLINE_EXCEEDED.value[0]


@pytest.fixture
def fakes() -> Iterator[tuple[FakeUpstream, FakeDashScope]]:
    with dashscope_fakes(KEY, 64) as pair:
        yield pair


def upstream_processes(fakes: tuple[FakeUpstream, FakeDashScope], logs: Path) -> dict[str, ServiceProcess]:
    cap_fake, emb_fake = fakes
    quiet = {"LOG_LEVEL": "WARNING"}
    embedder_env = {f"EMBEDDER_{k}": v for k, v in quiet.items()}
    captioner_env = {f"CAPTIONER_{k}": v for k, v in quiet.items()}
    if BACKEND == "dashscope":
        embedder_env |= {"EMBEDDER_BACKEND": "dashscope", "EMBEDDER_DASHSCOPE__API_KEY": KEY,
                         "EMBEDDER_DASHSCOPE__BASE_URL": emb_fake.base_url, "EMBEDDER_DASHSCOPE__DIMENSION": "64",
                         "EMBEDDER_DASHSCOPE__MAX_CONCURRENT_CALLS": "16"}
        captioner_env |= {"CAPTIONER_BACKEND": "dashscope", "CAPTIONER_API_KEY": KEY,
                          "CAPTIONER_BASE_URL": cap_fake.base_url, "CAPTIONER_MAX_CONCURRENCY": "16"}
    return {"embedder": ServiceProcess("embedder", embedder_env, logs),
            "captioner": ServiceProcess("captioner", captioner_env, logs)}


async def wait_for(predicate: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("victim", ["captioner", "embedder"])
async def test_kill9_mid_ingest_then_rerun_stores_each_item_exactly_once(
        victim: str, fakes: tuple[FakeUpstream, FakeDashScope], milvus_server: MilvusLiteServer,
        tmp_path: Path) -> None:
    procs = upstream_processes(fakes, tmp_path)
    search = None
    collection = f"kill9_{victim}"
    try:
        for p in procs.values():
            p.start()
        for p in procs.values():
            await p.wait_ready_async(240)
        search = await start_search(milvus_server.uri, procs["embedder"].address, procs["captioner"].address,
                                    collection=collection, upstream_attempts=2,
                                    upstream_timeout_s=20 if BACKEND == "dashscope" else 300,
                                    caption_concurrency=16, embed_batch_items=16)
        items = items_of(distinct_images(N, seed={"captioner": 101, "embedder": 202}[victim]))
        requests = chunks(items, 25)
        first = IngestRun()
        marks: dict[str, float] = {}
        target = procs[victim]

        async def stream() -> AsyncIterator[search_pb2.IngestRequest]:
            cut1, cut2 = int(0.3 * N) // 25, int(0.7 * N) // 25
            for r in requests[:cut1]:
                yield r
            await wait_for(lambda: len(first.outcomes) >= int(0.15 * N), 240, "the first outcomes")
            target.kill9()  # SIGKILL with items in flight
            marks["killed"] = time.monotonic()
            target.start()  # same port; takes a while to serve again
            for r in requests[cut1:cut2]:
                yield r
            await target.wait_ready_async(240)
            # Search itself stays SERVING throughout (Milvus answers); the capability that
            # needs the victim says when search reaches it again.
            capability = {"captioner": "ingest.caption", "embedder": "ingest"}[victim]
            await wait_health(search.address, SERVING, 15, "search after the restart", service=capability)
            marks["recovered"] = time.monotonic()
            for r in requests[cut2:]:
                yield r

        async with grpc.aio.insecure_channel(search.address) as channel:
            stub = search_pb2_grpc.SearchStub(channel)
            async for reply in stub.Ingest(stream(), timeout=600):
                first.add(reply)

            # First run: every item accounted for; each failure has a reason.
            assert sorted(first.outcomes) == list(range(N)), "every item gets exactly one outcome"
            assert first.progress.in_flight == 0 and first.progress.received == N
            failed, stored = first.failed, first.stored
            assert len(failed) + len(stored) == N
            assert failed, "the kill failed the items in flight"
            stage = "caption failed" if victim == "captioner" else "embedding failed"
            for i, o in failed.items():
                assert o.error.code in (UNAVAILABLE, DEADLINE), (i, o.error)
                assert o.error.message.startswith(stage) and victim in o.error.message, (i, o.error.message)
                assert len(o.id) == 64, "failed items still report their content-hash id"
            late = [i for i in failed if i >= int(0.7 * N) // 25 * 25]
            assert not late, {i: failed[i].error.message for i in late[:5]}  # sent after recovery

            # Re-run: exactly the failed ones are stored now.
            second = await ingest_all(stub, items, timeout_s=600)
            assert second.progress.failed == 0, [o.error.message for o in list(second.failed.values())[:3]]
            assert second.progress.stored == len(failed)
            assert second.progress.unchanged == len(stored)
            stats = await stub.Stats(search_pb2.StatsRequest(), timeout=30)
            assert stats.item_count == N
            ids = [first.outcomes[i].id for i in range(N)]
            got = await stub.Get(search_pb2.GetRequest(ids=ids[:1000]), timeout=60)
            assert not got.missing_ids and len(got.records) == min(N, 1000)

        # Milvus itself: N rows, N distinct ids.
        client = MilvusClient(uri=milvus_server.uri)
        try:
            rows = client.query(collection, filter="id != ''", output_fields=["id"], limit=16384)
        finally:
            client.close()
        assert len(rows) == N and len({r["id"] for r in rows}) == N and {r["id"] for r in rows} == set(ids)
        print(f"\n{victim}: kill -9 with {N} items, first run stored {len(stored)} failed {len(failed)}, "
              f"recovered {marks['recovered'] - marks['killed']:.1f} s after the kill; re-run stored "
              f"{second.progress.stored}, unchanged {second.progress.unchanged}")
    finally:
        if search is not None:
            await search.stop(0.5)
        for p in procs.values():
            p.stop()
