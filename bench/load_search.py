"""Load: N concurrent clients for T seconds against the search service, on loopback.

Each client is closed-loop (its next query leaves when the previous one answered) and
cycles through a mix of queries: text -> image, text -> caption, hybrid (RRF and
weighted), image -> image, a ready-made vector, and a filtered query. Counted: every
status code (the only error allowed is RESOURCE_EXHAUSTED, the explicit backpressure of
SEARCH_MAX_CONCURRENT_SEARCHES + SEARCH_MAX_WAITING_SEARCHES), latency percentiles of the
answered calls, and the resident memory of the search process sampled every second
(start = after warm-up, end, max).

    python bench/load_search.py                         # 200 clients x 60 s, own suite (lite models)
    python bench/load_search.py --clients 20 --seconds 5 --images 40
    python bench/load_search.py --limits 8,16                # tight admission: explicit backpressure
    python bench/load_search.py --target 127.0.0.1:50050 --pid 1234 --token T   # a running search

Exit status 1 when any call ended with a code other than OK / RESOURCE_EXHAUSTED.
Loopback only; bounded by --seconds (plus start-up and the last in-flight calls).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import io
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import grpc

from bench import common as C
from mmsearch.common.v1 import types_pb2
from mmsearch.search.v1 import search_pb2, search_pb2_grpc

ALLOWED = {"OK", "RESOURCE_EXHAUSTED"}


@dataclass
class LoadResult:
    clients: int
    seconds: float
    codes: collections.Counter[str] = field(default_factory=collections.Counter)
    ok_s: list[float] = field(default_factory=list)
    rejected_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # first few unexpected ones, code: details
    rss_mb: list[float] = field(default_factory=list)  # search process, one sample a second

    @property
    def calls(self) -> int:
        return sum(self.codes.values())

    @property
    def unexpected(self) -> dict[str, int]:
        return {k: v for k, v in self.codes.items() if k not in ALLOWED}

    def summary(self) -> dict[str, Any]:
        ok = C.summary_ms(self.ok_s)
        out: dict[str, Any] = {
            "clients": self.clients, "seconds": round(self.seconds, 1), "calls": self.calls,
            "codes": dict(self.codes), "qps_ok": round(len(self.ok_s) / self.seconds, 1) if self.seconds else 0,
            "p50_ms": round(ok["p50"], 1), "p90_ms": round(ok["p90"], 1), "p99_ms": round(ok["p99"], 1),
            "max_ms": round(max(self.ok_s) * 1000, 1) if self.ok_s else None,
            "rejection_p99_ms": round(C.pct([r * 1000 for r in self.rejected_s], 99), 1) if self.rejected_s else None,
        }
        if self.rss_mb:
            out |= {"rss_start_mb": round(self.rss_mb[0], 1), "rss_end_mb": round(self.rss_mb[-1], 1),
                    "rss_max_mb": round(max(self.rss_mb), 1)}
        return out


def query_mix(dimension: int, image: bytes, label: str = "") -> list[search_pb2.SearchRequest]:
    """One of each kind of query a backend service sends."""
    vector = [((i * 7919) % 97 - 48) / 48.0 for i in range(dimension)]
    hybrid = search_pb2.TARGET_HYBRID
    mix = [
        search_pb2.SearchRequest(query=types_pb2.Content(text="a cat sleeping"), top_k=10),
        search_pb2.SearchRequest(query=types_pb2.Content(text="a cup of coffee"), target=search_pb2.TARGET_CAPTION,
                                 top_k=10),
        search_pb2.SearchRequest(query=types_pb2.Content(text="a rocket"), target=hybrid, top_k=10),
        search_pb2.SearchRequest(query=types_pb2.Content(text="a red flower"), target=hybrid, top_k=10, fusion=(
            search_pb2.Fusion(method=search_pb2.FUSION_METHOD_WEIGHTED, image_weight=0.7, caption_weight=0.3))),
        search_pb2.SearchRequest(query=types_pb2.Content(image=types_pb2.Image(data=image)), top_k=10),
        search_pb2.SearchRequest(query_vector=types_pb2.Embedding(values=vector), top_k=10, offset=5),
        search_pb2.SearchRequest(query=types_pb2.Content(text="a photo"), top_k=5,
                                 filter=f'metadata["label"] == "{label}"' if label else "ingested_at_ms > 0"),
    ]
    return mix


async def drive(stubs: Sequence[Any], requests: Sequence[search_pb2.SearchRequest], clients: int, seconds: float,
                deadline_s: float = 30.0, metadata: Any = None, rss: Callable[[], float] | None = None,
                backoff_s: float = 0.01) -> LoadResult:
    """`clients` closed-loop clients for `seconds`; every call has a deadline."""
    result = LoadResult(clients, seconds)
    stop_at = time.perf_counter() + seconds

    async def client(c: int) -> None:
        stub = stubs[c % len(stubs)]
        i = c
        while time.perf_counter() < stop_at:
            request = requests[i % len(requests)]
            i += 1
            t = time.perf_counter()
            try:
                await stub.Search(request, timeout=deadline_s, metadata=metadata)
                result.ok_s.append(time.perf_counter() - t)
                result.codes["OK"] += 1
            except grpc.aio.AioRpcError as e:
                result.codes[e.code().name] += 1
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    result.rejected_s.append(time.perf_counter() - t)
                    await asyncio.sleep(backoff_s)  # a polite client backs off
                elif len(result.errors) < 5:
                    result.errors.append(f"{e.code().name}: {e.details()}")

    async def sample() -> None:
        while rss is not None:
            result.rss_mb.append(rss())
            await asyncio.sleep(1.0)

    sampler = asyncio.create_task(sample())
    started = time.perf_counter()
    try:
        await asyncio.gather(*(client(c) for c in range(clients)))
    finally:
        result.seconds = time.perf_counter() - started
        sampler.cancel()
        if rss is not None:
            result.rss_mb.append(rss())
    return result


async def prepare(stub: Any, images: int, metadata: Any = None) -> tuple[int, bytes]:
    """Ingests `images` sample photos (with labels); returns (dimension, a query image)."""
    from PIL import Image

    jpegs = C.sample_jpegs(images, max_side=256)
    requests = C.ingest_requests(jpegs, chunk=16)
    for r in requests:
        for j, item in enumerate(r.items):
            item.metadata_json = json.dumps({"label": f"l{j % 4}"})
    counts = await _ingest_with(stub, requests, metadata)
    print(f"ingested: {counts}", flush=True)
    dimension = (await stub.Stats(search_pb2.StatsRequest(), timeout=30, metadata=metadata)).dimension
    buf = io.BytesIO()
    Image.open(io.BytesIO(jpegs[0])).resize((96, 96)).save(buf, format="JPEG")
    return dimension, buf.getvalue()


async def _ingest_with(stub: Any, requests: Sequence[Any], metadata: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    async for reply in stub.Ingest(iter(requests), timeout=600, metadata=metadata):
        p = reply.progress
        counts = {"stored": p.stored, "unchanged": p.unchanged, "failed": p.failed}
    return counts


async def main_async(args: argparse.Namespace) -> int:
    C.header(f"Load: {args.clients} clients x {args.seconds:.0f} s against search")
    suite = None
    metadata = (("authorization", f"Bearer {args.token}"),) if args.token else None
    if args.target:
        address, pid = args.target, args.pid
    else:
        env = {"SEARCH_LOG_LEVEL": "WARNING"}
        if args.limits:
            active, waiting = args.limits.split(",")
            env |= {"SEARCH_MAX_CONCURRENT_SEARCHES": active, "SEARCH_MAX_WAITING_SEARCHES": waiting}
        suite = C.Suite(search_env=env)
        await suite.start()
        address, pid = suite.search.address, suite.search.pid
    channels = [grpc.aio.insecure_channel(address, options=C.CLIENT_OPTIONS) for _ in range(args.channels)]
    try:
        stubs = [search_pb2_grpc.SearchStub(ch) for ch in channels]
        dimension, image = await prepare(stubs[0], args.images, metadata)
        requests = query_mix(dimension, image, label="l1")
        rss = (lambda: C.rss_mb(pid)) if pid else None
        await drive(stubs, requests, min(args.clients, 8), 3.0, args.deadline, metadata)  # warm-up
        result = await drive(stubs, requests, args.clients, args.seconds, args.deadline, metadata, rss)
    finally:
        for ch in channels:
            await ch.close()
        if suite is not None:
            suite.cleanup()
    s = result.summary()
    C.print_table("Status codes", ["code", "calls"], sorted(result.codes.items()))
    C.print_table("Answered calls (ms)", ["clients", "seconds", "calls", "QPS", "p50", "p90", "p99", "max",
                                          "RESOURCE_EXHAUSTED", "rejection p99"],
                  [[s["clients"], s["seconds"], s["calls"], s["qps_ok"], s["p50_ms"], s["p90_ms"], s["p99_ms"],
                    s["max_ms"], result.codes.get("RESOURCE_EXHAUSTED", 0), s["rejection_p99_ms"] or "-"]])
    if result.rss_mb:
        C.print_table("Search process RSS (MiB)", ["start", "end", "max", "end - start"],
                      [[s["rss_start_mb"], s["rss_end_mb"], s["rss_max_mb"], s["rss_end_mb"] - s["rss_start_mb"]]])
    print("\n" + json.dumps(s))
    if args.json:
        Path(args.json).write_text(json.dumps(s, indent=2))
    if result.unexpected:
        print(f"\nUNEXPECTED errors: {result.unexpected}; first: {result.errors}")
        return 1
    print("\nno errors other than RESOURCE_EXHAUSTED")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--images", type=int, default=200, help="sample photos ingested before the load")
    parser.add_argument("--channels", type=int, default=4, help="client connections shared by the clients")
    parser.add_argument("--deadline", type=float, default=30.0, help="per-call deadline, seconds")
    parser.add_argument("--target", default="", help="a running search service (default: start a suite)")
    parser.add_argument("--pid", type=int, default=0, help="its process id, for RSS (with --target)")
    parser.add_argument("--token", default="", help="bearer token (with --target)")
    parser.add_argument("--limits", default="", help="ACTIVE,WAITING admission limits of the suite's search "
                        "(SEARCH_MAX_CONCURRENT_SEARCHES, SEARCH_MAX_WAITING_SEARCHES; default 64,256)")
    parser.add_argument("--json", default="", help="also write the summary here")
    parser.add_argument("--quick", action="store_true", help="20 clients x 5 s, 40 images")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.seconds, args.images = 20, 5.0, 40
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
