"""Search orchestration overhead: what the search service adds on top of the embedder and
Milvus, for the same queries in the same run.

For every query the service reports `timings` (embed_ms: its Embedder.Embed call,
milvus_ms: its Milvus call, total_ms: its whole Search handling). The client measures
end-to-end latency around the RPC. Per query:

    overhead (client)  = client e2e - embed_ms - milvus_ms   (gRPC hop to search, validation,
                                                               admission, proto building)
    overhead (server)  = total_ms  - embed_ms - milvus_ms   (inside the service only)

A no-op RPC on the same channel (grpc.health.v1 Check) gives the floor of one gRPC hop on
this machine, so the rest of the overhead is ours. Goal: overhead (client) p50 <= 2 ms.

The suite runs as separate processes (embedder, captioner, search; Milvus Lite embedded
in the search process, or as its own server process), the client in this one.

    python bench/search_overhead.py                      # both Milvus modes, ~3 min on 2 vCPU
    python bench/search_overhead.py --quick              # ~1.5 min
    python bench/search_overhead.py --milvus embedded --n 500
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import common as C
from mmsearch.common.v1 import types_pb2
from mmsearch.search.v1 import search_pb2, search_pb2_grpc

TEXTS = ["a cat", "a cup of coffee", "a rocket", "a red motorcycle", "a pink flower", "a temple among trees",
         "a man with a camera", "a wall clock", "a brick wall", "the moon", "a galaxy", "a coin"]


def modes(query_jpegs: list[bytes], dim: int) -> dict[str, Any]:
    """mode name -> function(i) -> SearchRequest."""
    vec = C.unit_vectors(16, dim, seed=7)

    def text(target: int) -> Any:
        return lambda i: search_pb2.SearchRequest(query=types_pb2.Content(text=TEXTS[i % len(TEXTS)]), target=target,
                                                  top_k=10)

    return {
        "text->image": text(search_pb2.TARGET_IMAGE),
        "text->caption": text(search_pb2.TARGET_CAPTION),
        "text->hybrid (RRF)": text(search_pb2.TARGET_HYBRID),
        "image->image": lambda i: search_pb2.SearchRequest(
            query=types_pb2.Content(image=types_pb2.Image(data=query_jpegs[i % len(query_jpegs)])),
            target=search_pb2.TARGET_IMAGE, top_k=10),
        "vector->image (no embed)": lambda i: search_pb2.SearchRequest(
            query_vector=types_pb2.Embedding(values=vec[i % len(vec)].tolist()), target=search_pb2.TARGET_IMAGE,
            top_k=10),
    }


async def measure(stub: Any, make: Any, n: int, warmup: int) -> dict[str, list[float]]:
    for i in range(warmup):
        await stub.Search(make(i), timeout=30)
    out: dict[str, list[float]] = {"e2e": [], "embed": [], "milvus": [], "total": [], "ovh_client": [], "ovh_server": []}
    for i in range(n):
        req = make(i)
        t = time.perf_counter()
        reply = await stub.Search(req, timeout=30)
        e2e = (time.perf_counter() - t) * 1000
        tm = reply.timings
        out["e2e"].append(e2e)
        out["embed"].append(tm.embed_ms)
        out["milvus"].append(tm.milvus_ms)
        out["total"].append(tm.total_ms)
        out["ovh_client"].append(e2e - tm.embed_ms - tm.milvus_ms)
        out["ovh_server"].append(tm.total_ms - tm.embed_ms - tm.milvus_ms)
    return out


async def hop_floor(channel: grpc.aio.Channel, n: int) -> list[float]:
    health = health_pb2_grpc.HealthStub(channel)
    req = health_pb2.HealthCheckRequest()
    for _ in range(10):
        await health.Check(req, timeout=5)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        await health.Check(req, timeout=5)
        times.append((time.perf_counter() - t) * 1000)
    return times


async def run_mode(milvus: str, args: argparse.Namespace) -> list[list[Any]]:
    rows: list[list[Any]] = []
    async with C.Suite(milvus=milvus) as suite, \
            grpc.aio.insecure_channel(suite.search.address, options=C.CLIENT_OPTIONS) as channel:
            stub = search_pb2_grpc.SearchStub(channel)
            jpegs = C.sample_jpegs(args.images, max_side=512)
            started = time.perf_counter()
            counts = await C.ingest_all(stub, C.ingest_requests(jpegs))
            print(f"[{milvus}] ingested {counts} in {time.perf_counter() - started:.1f} s", flush=True)
            stats = await stub.Stats(search_pb2.StatsRequest(), timeout=30)
            floor = await hop_floor(channel, args.n)
            for name, make in modes(C.sample_jpegs(max_side=512), stats.dimension).items():
                r = await measure(stub, make, args.n, args.warmup)
                rows.append([
                    milvus, name, C.pct(r["e2e"], 50), C.pct(r["e2e"], 99), C.pct(r["embed"], 50),
                    C.pct(r["milvus"], 50), C.pct(r["ovh_client"], 50), C.pct(r["ovh_client"], 99),
                    C.pct(r["ovh_server"], 50), C.pct(floor, 50),
                    C.pct(r["ovh_client"], 50) - C.pct(floor, 50),
                ])
                print(f"[{milvus}] {name}: e2e p50 {rows[-1][2]:.2f} ms, overhead p50 {rows[-1][6]:.2f} ms", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--milvus", default="embedded,server", help="comma list of embedded, server")
    parser.add_argument("--n", type=int, default=300, help="queries per mode")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--images", type=int, default=96, help="images ingested before searching")
    parser.add_argument("--quick", action="store_true", help="fewer queries and images")
    args = parser.parse_args()
    if args.quick:
        args.n, args.images, args.warmup = 100, 24, 10
    C.header("Search orchestration overhead")
    rows: list[list[Any]] = []
    for milvus in [m for m in args.milvus.split(",") if m]:
        rows += asyncio.run(run_mode(milvus, args))
    C.print_table(
        f"Search overhead, 1 client, sequential, top_k 10 (ms; {args.n} queries per mode)",
        ["milvus", "mode", "e2e p50", "e2e p99", "embed p50", "milvus p50", "overhead p50", "overhead p99",
         "in-service p50", "gRPC no-op p50", "overhead - no-op p50"],
        rows,
    )
    print("\noverhead = client e2e - embed_ms - milvus_ms per query (goal: p50 <= 2 ms);"
          " in-service = total_ms - embed_ms - milvus_ms; gRPC no-op = health Check on the same channel.")


if __name__ == "__main__":
    main()
