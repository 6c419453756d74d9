"""Memory: resident set size of every service process at idle, after an ingest, during a
sustained mixed search + re-ingest load, and at idle again afterwards.

Growth is judged on the load phase only: the first sample after a warm-up (10 % of the
duration) against the last, plus a least-squares slope in MiB per minute over the whole
phase. A slope near zero (and well under the noise of a few MiB) means no leak; the
10-minute run is the one the issue asks for (`--duration 600`).

    python bench/search_memory.py                   # 2 min load, ~4 min on 2 vCPU
    python bench/search_memory.py --duration 600    # the 10-minute soak
    python bench/search_memory.py --quick           # 30 s load
    python bench/search_memory.py --milvus server   # Milvus Lite in its own process
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import grpc
import numpy as np

from bench import common as C
from mmsearch.common.v1 import types_pb2
from mmsearch.search.v1 import search_pb2, search_pb2_grpc


def rss(suite: C.Suite) -> dict[str, float]:
    return {name: C.rss_mb(p.pid) for name, p in suite.procs.items()}


async def load(stub: Any, seconds: float, clients: int, jpegs: list[bytes], dim: int, suite: C.Suite,
               every_s: float) -> tuple[list[tuple[float, dict[str, float]]], collections.Counter[str]]:
    """Mixed queries (text, image, hybrid, vector with filters and pages) plus a re-ingest
    of the same images now and then (all UNCHANGED: the idempotent path)."""
    vecs = C.unit_vectors(32, dim, seed=9)
    stop_at = time.perf_counter() + seconds
    codes: collections.Counter[str] = collections.Counter()
    samples: list[tuple[float, dict[str, float]]] = []
    started = time.perf_counter()

    def request(i: int) -> Any:
        kind = i % 5
        if kind == 0:
            return search_pb2.SearchRequest(query=types_pb2.Content(text=f"a cat number {i}"), top_k=10)
        if kind == 1:
            return search_pb2.SearchRequest(query=types_pb2.Content(image=types_pb2.Image(data=jpegs[i % len(jpegs)])),
                                            top_k=10)
        if kind == 2:
            return search_pb2.SearchRequest(query=types_pb2.Content(text=f"coffee {i}"), top_k=10,
                                            target=search_pb2.TARGET_HYBRID)
        if kind == 3:
            return search_pb2.SearchRequest(query_vector=types_pb2.Embedding(values=vecs[i % 32].tolist()), top_k=20,
                                            offset=10, filter='array_contains(keywords, "bench") or uri == ""')
        return search_pb2.SearchRequest(query=types_pb2.Content(text=f"temple {i}"), top_k=5,
                                        target=search_pb2.TARGET_CAPTION)

    async def call(i: int) -> None:
        try:
            await stub.Search(request(i), timeout=60)
            codes["OK"] += 1
        except grpc.aio.AioRpcError as e:
            codes[e.code().name] += 1

    async def reingest() -> None:
        while time.perf_counter() < stop_at:
            counts = await C.ingest_all(stub, C.ingest_requests(jpegs))
            codes["reingested_unchanged"] += counts["unchanged"]
            await asyncio.sleep(min(5.0, max(0.0, stop_at - time.perf_counter())))

    async def sampler() -> None:
        while time.perf_counter() < stop_at:
            samples.append((time.perf_counter() - started, rss(suite)))
            await asyncio.sleep(min(every_s, max(0.0, stop_at - time.perf_counter())))

    await asyncio.gather(sampler(), reingest(), C.closed_loop(call, clients, stop_at))
    samples.append((time.perf_counter() - started, rss(suite)))
    return samples, codes


async def main_async(args: argparse.Namespace) -> None:
    async with C.Suite(milvus=args.milvus) as suite:
        idle0 = rss(suite)
        async with grpc.aio.insecure_channel(suite.search.address, options=C.CLIENT_OPTIONS) as channel:
            stub = search_pb2_grpc.SearchStub(channel)
            jpegs = C.sample_jpegs(args.images, max_side=512)
            counts = await C.ingest_all(stub, C.ingest_requests(jpegs))
            print(f"ingested {counts}", flush=True)
            after_ingest = rss(suite)
            dim = (await stub.Stats(search_pb2.StatsRequest(), timeout=30)).dimension
            samples, codes = await load(stub, args.duration, args.clients, jpegs, dim, suite, args.every)
            print(f"load done: {dict(codes)}", flush=True)
            await asyncio.sleep(args.idle_after)
            idle1 = rss(suite)
    warm = [s for s in samples if s[0] >= 0.1 * args.duration] or samples
    rows = []
    for name in idle0:
        t = np.array([s[0] for s in warm])
        v = np.array([s[1][name] for s in warm])
        slope = float(np.polyfit(t / 60, v, 1)[0]) if len(v) >= 3 else float("nan")
        rows.append([name, idle0[name], after_ingest[name], v[0], float(v.max()), v[-1], v[-1] - v[0], slope,
                     idle1[name]])
    C.print_table(
        f"RSS MiB: {args.duration:.0f} s mixed load, {args.clients} search clients + re-ingest of {args.images} images"
        f" every 5 s, Milvus {args.milvus}",
        ["process", "idle (start)", "after ingest", "load (after warm-up)", "load max", "load end",
         "growth in load", "slope MiB/min", f"idle again (+{args.idle_after:.0f} s)"], rows, digits=1)
    print(f"\nrequests: {dict(codes)}; samples every {args.every:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--every", type=float, default=5.0, help="RSS sample period, s")
    parser.add_argument("--idle-after", type=float, default=10.0)
    parser.add_argument("--milvus", default="embedded", choices=["embedded", "server"])
    parser.add_argument("--quick", action="store_true", help="30 s load, 24 images")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.images, args.every = 30.0, 24, 2.0
    C.header("Service memory (RSS)")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
