"""An embedder rollout is invisible to callers (issue 14, "Draining under rollout").

Two embedder processes (`python -m services.embedder`, DashScope backend against the local
protocol fake) sit behind one search channel that resolves to both (round-robin, as search's
channels do over a headless Service). During 30 s of text searches at 20 per second (open
loop: each search starts on schedule whatever the others do), one embedder gets SIGTERM, as
Kubernetes sends it in a rollout or a node drain: it turns NOT_SERVING, refuses new calls and
finishes those in flight; search's channel moves new calls to the other replica and retries
refused ones there. No search may fail.
"""
from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from mmsearch.captioner.v1 import captioner_pb2, captioner_pb2_grpc
from mmsearch.common.v1 import types_pb2
from mmsearch.search.v1 import search_pb2, search_pb2_grpc
from services.common.channels import create_channel
from services.common.server import start_server
from tests.captioner.fakes import FakeUpstream
from tests.common.runtime_app import RuntimeTestSettings, make_app
from tests.conftest import MilvusLiteServer
from tests.embedder.dashscope_fake import FakeDashScope
from tests.reliability.helpers import (
    ServiceProcess,
    dashscope_fakes,
    distinct_images,
    ingest_all,
    items_of,
    start_search,
)

KEY = "sk-rollout-test-key"
RATE_PER_S = 20
DURATION_S = 30.0
SIGTERM_AT_S = 10.0


@pytest.fixture
def fakes() -> Iterator[tuple[FakeUpstream, FakeDashScope]]:
    with dashscope_fakes(KEY, 64) as pair:
        yield pair


async def test_sigterm_to_one_of_two_embedders_fails_no_search(
        fakes: tuple[FakeUpstream, FakeDashScope], milvus_server: MilvusLiteServer, tmp_path: Path) -> None:
    cap_fake, emb_fake = fakes
    embedder_env = {"EMBEDDER_LOG_LEVEL": "WARNING", "EMBEDDER_BACKEND": "dashscope",
                    "EMBEDDER_DASHSCOPE__API_KEY": KEY, "EMBEDDER_DASHSCOPE__BASE_URL": emb_fake.base_url,
                    "EMBEDDER_DASHSCOPE__DIMENSION": "64", "EMBEDDER_SHUTDOWN_GRACE_S": "5"}
    embedders = [ServiceProcess("embedder", embedder_env, tmp_path / f"e{i}") for i in range(2)]
    captioner = ServiceProcess("captioner", {"CAPTIONER_LOG_LEVEL": "WARNING", "CAPTIONER_BACKEND": "dashscope",
                                             "CAPTIONER_API_KEY": KEY, "CAPTIONER_BASE_URL": cap_fake.base_url},
                               tmp_path)
    search = None
    try:
        for p in (*embedders, captioner):
            p.start()
        for p in (*embedders, captioner):
            await p.wait_ready_async(120)
        target = "ipv4:" + ",".join(e.address for e in embedders)
        search = await start_search(milvus_server.uri, target, captioner.address, collection="rollout")
        async with grpc.aio.insecure_channel(search.address) as channel:
            stub = search_pb2_grpc.SearchStub(channel)
            assert (await ingest_all(stub, items_of(distinct_images(8, seed=145)))).progress.stored == 8
            failures: list[str] = []
            latencies: list[float] = []

            async def one_search(i: int) -> None:
                start = time.perf_counter()
                try:
                    reply = await stub.Search(search_pb2.SearchRequest(
                        query=types_pb2.Content(text=f"a photo number {i}"), top_k=3), timeout=10)
                    assert len(reply.hits) == 3
                except (grpc.aio.AioRpcError, AssertionError) as e:
                    failures.append(f"search {i} at {time.perf_counter() - t0:.2f} s: {e!r}")
                latencies.append(time.perf_counter() - start)

            victim = embedders[0]
            t0 = time.perf_counter()
            tasks = []
            terminated_at = None
            for i in range(int(DURATION_S * RATE_PER_S)):
                due = t0 + i / RATE_PER_S
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                if terminated_at is None and time.perf_counter() - t0 >= SIGTERM_AT_S:
                    victim.send_signal(signal.SIGTERM)  # what the kubelet sends
                    terminated_at = time.perf_counter() - t0
                tasks.append(asyncio.create_task(one_search(i)))
            await asyncio.gather(*tasks)
            elapsed = time.perf_counter() - t0
            exit_code = await asyncio.to_thread(victim.wait, 15)
            latencies.sort()
            print(f"{len(tasks)} searches in {elapsed:.1f} s, SIGTERM at {terminated_at:.1f} s, "
                  f"{len(failures)} failed; p50 {latencies[len(latencies) // 2] * 1000:.0f} ms, "
                  f"p99 {latencies[int(len(latencies) * 0.99)] * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms; "
                  f"victim exit code {exit_code}")
            assert not failures, failures[:5]
            assert len(tasks) == DURATION_S * RATE_PER_S
            assert exit_code == 0, "the embedder drained and exited cleanly"
            assert embedders[1].alive
    finally:
        if search is not None:
            await search.stop(0.5)
        for p in (*embedders, captioner):
            p.stop()


SHUTDOWN_TRIALS = 24
CALLS_PER_TRIAL = 400


async def _calls_around_a_shutdown() -> dict[str, int]:
    """Two replicas of the runtime test app behind search's own channel factory (round-robin,
    the shared retry policy); one replica stops (`RunningServer.stop`, the SIGTERM path) while
    calls start every 0.5 ms. Returns the count of each final status code."""
    codes: dict[str, int] = {}

    async def one(stub: captioner_pb2_grpc.CaptionerStub) -> None:
        try:
            await stub.Info(captioner_pb2.InfoRequest(), timeout=5)
            code = "OK"
        except grpc.aio.AioRpcError as e:
            code = e.code().name
        codes[code] = codes.get(code, 0) + 1

    for _ in range(SHUTDOWN_TRIALS):
        settings = RuntimeTestSettings(host="127.0.0.1", grpc_port=0, metrics_port=-1)
        replicas = [await start_server(settings, make_app(settings)) for _ in range(2)]
        channel = create_channel("ipv4:" + ",".join(f"127.0.0.1:{r.port}" for r in replicas))
        try:
            stub = captioner_pb2_grpc.CaptionerStub(channel)
            await stub.Info(captioner_pb2.InfoRequest(), timeout=5)

            calls, stopping = [], None
            for i in range(CALLS_PER_TRIAL):
                calls.append(asyncio.create_task(one(stub)))
                if i == CALLS_PER_TRIAL // 2:
                    stopping = asyncio.create_task(replicas[0].stop(5))
                await asyncio.sleep(0.0005)
            await asyncio.gather(*calls)
            assert stopping is not None
            await stopping
        finally:
            await channel.close()
            await replicas[1].stop(0)
    return codes


async def test_calls_a_stopping_replica_received_but_had_not_started_go_to_the_other() -> None:
    """A gRPC server that starts shutting down cancels the calls it has received but not yet
    handed to a handler: without a retry the caller sees CANCELLED (this failed the test above
    in one CI run). The shared retry policy retries them on the other replica.
    Without CANCELLED in the policy this test saw 10 CANCELLED of 9,600 calls; with it, none."""
    codes = await _calls_around_a_shutdown()
    assert codes == {"OK": SHUTDOWN_TRIALS * CALLS_PER_TRIAL}, codes
