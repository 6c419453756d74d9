"""Concurrency: QPS and latency percentiles at 1, 8, 32 and 128 concurrent search clients,
the knee of the curve, and backpressure beyond the admission limits.

Each client is closed-loop (sends its next query when the previous one answered) and,
refused with RESOURCE_EXHAUSTED, retries after an exponential backoff (10 ms doubling to
1 s, full jitter), as the refusal asks. The knee is the smallest concurrency that already reaches >= 90 % of the best QPS: beyond it,
more clients only add queueing latency. Then the search service is restarted with small
admission limits (`SEARCH_MAX_CONCURRENT_SEARCHES`, `SEARCH_MAX_WAITING_SEARCHES`) and
driven past them: it must answer RESOURCE_EXHAUSTED at once instead of queueing without
bound, so accepted calls keep a bounded latency.

    python bench/search_concurrency.py                   # text->image queries, ~4 min on 2 vCPU
    python bench/search_concurrency.py --quick           # ~1.5 min
    python bench/search_concurrency.py --query vector    # no embedder: search service + Milvus only
    python bench/search_concurrency.py --clients 1,2,4,8,16,32,64,128 --seconds 20
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import grpc

from bench import common as C
from mmsearch.common.v1 import types_pb2
from mmsearch.search.v1 import search_pb2, search_pb2_grpc

CHANNELS = 4  # client connections, shared round-robin by the clients
BACKOFF_S = (0.01, 1.0)  # first and largest retry delay after RESOURCE_EXHAUSTED


def make_request(kind: str, i: int, vecs: Any) -> Any:
    if kind == "vector":
        return search_pb2.SearchRequest(query_vector=types_pb2.Embedding(values=vecs[i % len(vecs)].tolist()), top_k=10)
    return search_pb2.SearchRequest(query=types_pb2.Content(text=f"a photo of a cat, take {i}"), top_k=10)


async def closed_loop(stubs: list[Any], kind: str, clients: int, seconds: float, vecs: Any,
                      ) -> tuple[float, list[float], list[float], collections.Counter[str], float]:
    ok: list[float] = []
    rejected: list[float] = []
    codes: collections.Counter[str] = collections.Counter()
    server_wait: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def client(c: int) -> None:
        stub = stubs[c % len(stubs)]
        rng = random.Random(c)
        backoff = BACKOFF_S[0]
        i = c
        while time.perf_counter() < stop_at:
            t = time.perf_counter()
            try:
                reply = await stub.Search(make_request(kind, i, vecs), timeout=60)
                ok.append(time.perf_counter() - t)
                codes["OK"] += 1
                tm = reply.timings
                server_wait.append(tm.total_ms - tm.embed_ms - tm.milvus_ms)
                backoff = BACKOFF_S[0]
            except grpc.aio.AioRpcError as e:
                codes[e.code().name] += 1
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    rejected.append(time.perf_counter() - t)
                    # As the refusal says: retry with backoff (exponential, full jitter).
                    await asyncio.sleep(rng.uniform(0, backoff))
                    backoff = min(backoff * 2, BACKOFF_S[1])
            i += clients

    started = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    elapsed = time.perf_counter() - started
    return len(ok) / elapsed, ok, rejected, codes, C.pct(server_wait, 50)


async def sweep(suite: C.Suite, args: argparse.Namespace, levels: list[int], ingest: bool) -> list[list[Any]]:
    channels = [grpc.aio.insecure_channel(suite.search.address, options=C.CLIENT_OPTIONS) for _ in range(CHANNELS)]
    try:
        stubs = [search_pb2_grpc.SearchStub(ch) for ch in channels]
        if ingest:
            await C.ingest_all(stubs[0], C.ingest_requests(C.sample_jpegs(args.images, max_side=512)))
        dim = (await stubs[0].Stats(search_pb2.StatsRequest(), timeout=30)).dimension
        vecs = C.unit_vectors(64, dim, seed=5)
        await closed_loop(stubs, args.query, 4, min(2.0, args.seconds), vecs)  # warm-up
        rows = []
        for n in levels:
            qps, ok, rej, codes, wait_p50 = await closed_loop(stubs, args.query, n, args.seconds, vecs)
            st = C.summary_ms(ok)
            other = {k: v for k, v in codes.items() if k not in ("OK", "RESOURCE_EXHAUSTED")}
            rows.append([n, qps, st["p50"], st["p99"], codes.get("RESOURCE_EXHAUSTED", 0),
                         C.pct([r * 1000 for r in rej], 99) if rej else float("nan"), wait_p50,
                         ", ".join(f"{k} {v}" for k, v in other.items()) or "-"])
            print(f"  {n} clients: {qps:.1f} QPS, p50 {st['p50']:.1f} ms, p99 {st['p99']:.1f} ms, {dict(codes)}",
                  flush=True)
        return rows
    finally:
        for ch in channels:
            await ch.close()


async def main_async(args: argparse.Namespace) -> None:
    levels = [int(x) for x in args.clients.split(",")]
    headers = ["clients", "QPS", "p50 ms", "p99 ms", "RESOURCE_EXHAUSTED", "rejection p99 ms",
               "in-service wait p50 ms", "other errors"]
    async with C.Suite(milvus=args.milvus) as suite:
        print(f"default limits: {args.milvus} Milvus, query {args.query}", flush=True)
        rows = await sweep(suite, args, levels, ingest=True)
        # Same data, small admission limits: restart only the search process.
        env = {"SEARCH_MAX_CONCURRENT_SEARCHES": str(args.limit_active),
               "SEARCH_MAX_WAITING_SEARCHES": str(args.limit_waiting)}
        await suite.restart_search(env)
        print(f"limits {env}", flush=True)
        limited = await sweep(suite, args, [x for x in levels if x > 1], ingest=False)
    C.print_table(f"Concurrency, default limits (max {args.default_active} active + {args.default_waiting} waiting),"
                  f" {args.query} queries, {args.seconds:.0f} s per level", headers, rows)
    best = max(r[1] for r in rows)
    knee = next(r[0] for r in rows if r[1] >= 0.9 * best)
    print(f"\nknee: {knee} clients (first level with >= 90 % of the best QPS, {best:.1f});"
          f" p99 there {next(r[3] for r in rows if r[0] == knee):.1f} ms vs {rows[-1][3]:.1f} ms at {rows[-1][0]} clients")
    C.print_table(f"Backpressure: SEARCH_MAX_CONCURRENT_SEARCHES={args.limit_active},"
                  f" SEARCH_MAX_WAITING_SEARCHES={args.limit_waiting}", headers, limited)
    print(f"\nBeyond {args.limit_active + args.limit_waiting} calls in the service, calls are refused with"
          " RESOURCE_EXHAUSTED (rejection p99 = how fast the refusal comes back); accepted calls keep a bounded p99.")


def main() -> None:
    from services.search.settings import SearchSettings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,8,32,128")
    parser.add_argument("--seconds", type=float, default=15.0, help="per concurrency level")
    parser.add_argument("--query", default="text", choices=["text", "vector"])
    parser.add_argument("--milvus", default="embedded", choices=["embedded", "server"])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--limit-active", type=int, default=4)
    parser.add_argument("--limit-waiting", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="5 s per level, 24 images")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.images = 5.0, 24
    defaults = SearchSettings()
    args.default_active, args.default_waiting = defaults.max_concurrent_searches, defaults.max_waiting_searches
    C.header("Search concurrency")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
