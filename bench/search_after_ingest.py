"""Search right after an ingest, with the flush policy on and off (issue 17, item 2).

Rows Milvus has not flushed sit in a growing segment (Milvus Lite: its MemTable) that
every search scans by brute force, so a search right after a large ingest is slow until
they are flushed. This ingests `--sizes` items (cumulative: 1,600, then up to 20,000)
through the real suite, measures Search right after each Ingest stream ends (the moment
users hit: windows of seconds after the end), then restarts the search process on the
same Milvus data and measures again (the settled baseline). Both arms run in one
invocation, alternating, each on its own suite: `on` (the SEARCH_FLUSH_* defaults: also
every 2,000 rows while a stream writes), `endonly` (SEARCH_FLUSH_MAX_ROWS=0: only when a
stream ends or goes idle), `max5k` (SEARCH_FLUSH_MAX_ROWS=5000) and `off`
(SEARCH_FLUSH_MIN_ROWS, _IDLE_S and _MAX_ROWS 0: Milvus alone decides).

To make 20,000 ingests cheap, the embedder runs its DashScope backend against the local
DashScope-protocol fake of the tests (tests/embedder/dashscope_fake.py: deterministic
vectors, no model) and every item carries its caption (no captioner at all). Images are
small distinct JPEGs. Queries: `query_vector` searches (isolate Milvus) alternating with
text queries (one Embed call to the fake + the fused vector search).

    .venv/bin/python bench/search_after_ingest.py                    # 1,600 and 20,000, embedded
    .venv/bin/python bench/search_after_ingest.py --sizes 200 --windows 0,3 --quick   # smoke
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

import bench.common as C

KEY = "bench-key"


ARMS = {
    "on": {},  # the defaults (max_rows 2,000: also flush while a stream writes)
    "endonly": {"SEARCH_FLUSH_MAX_ROWS": "0"},  # the defaults before: flush only when a stream ends / idles
    "max5k": {"SEARCH_FLUSH_MAX_ROWS": "5000"},  # flush every 5,000 rows while a stream writes
    "omp1": {"OMP_NUM_THREADS": "1"},  # the defaults, Milvus Lite's index builds (faiss) on one core
    "off": {"SEARCH_FLUSH_MIN_ROWS": "0", "SEARCH_FLUSH_IDLE_S": "0", "SEARCH_FLUSH_MAX_ROWS": "0"},
}


def arm_env(arm: str) -> dict[str, str]:
    return {"SEARCH_LOG_LEVEL": "INFO", **ARMS[arm]}


def flush_log(suite: C.Suite) -> list[str]:
    """The search process' "flushed" log lines (reason, rows, seconds)."""
    import json

    log = suite.workdir / f"{suite.search.spec.name}.log"
    out = []
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        if "Milvus collection flushed" in line or "Milvus flush failed" in line:
            try:
                e = json.loads(line[line.index("{"):])
                out.append(f"{e.get('timestamp', '')[11:19]} {e.get('reason')} rows={e.get('rows')} "
                           f"{e.get('seconds')} s")
            except ValueError:
                out.append(line[-160:])
    return out


async def measure(stub: Any, windows: list[float], dim: int, seed: int) -> list[dict[str, Any]]:
    """Sequential searches from now until windows[-1] seconds; even requests by
    query_vector, odd ones by text. Per window: latencies by mode."""
    from mmsearch.common.v1 import types_pb2
    from mmsearch.search.v1 import search_pb2

    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    out = [{"from": a, "to": b, "vector": [], "text": []} for a, b in itertools.pairwise(windows)]
    i = 0
    while (now := time.perf_counter() - start) < windows[-1]:
        if i % 2 == 0:
            v = rng.standard_normal(dim).astype(np.float32)
            req = search_pb2.SearchRequest(query_vector=types_pb2.Embedding(values=v.tolist()), top_k=10)
            mode = "vector"
        else:
            req = search_pb2.SearchRequest(query=types_pb2.Content(text=f"a photo of thing {i}"), top_k=10)
            mode = "text"
        t = time.perf_counter()
        await stub.Search(req, timeout=120)
        took = time.perf_counter() - t
        for w in out:
            if w["from"] <= now < w["to"]:
                w[mode].append(took)
        i += 1
    return out


async def ingest(stub: Any, first: int, n: int, max_side: int) -> tuple[float, dict[str, int]]:
    jpegs = C.sample_jpegs(n, max_side=max_side, seed=first + 1)
    captions = [f"bench photo {first + i}: a sample picture" for i in range(n)]
    ids = [f"img-{first + i}" for i in range(n)]
    reqs = C.ingest_requests(jpegs, chunk=64, captions=captions, ids=ids)
    t = time.perf_counter()
    counts = await C.ingest_all(stub, reqs, timeout_s=3600)
    return time.perf_counter() - t, counts


def flushes(suite: C.Suite) -> str:
    try:
        m = C.scrape_metrics(suite.metrics_port)
    except OSError:
        return "-"
    n = {k[1]: v for k, v in m.items() if k[0] == "search_milvus_flushes_total"}
    secs = sum(v for k, v in m.items() if k[0] == "search_milvus_seconds_sum" and ("op", "flush") in k[1])
    parts = [f"{dict(labels)['reason']}:{int(v)}" for labels, v in sorted(n.items()) if v and
             dict(labels).get("outcome") == "ok"]
    return (" ".join(parts) + f" ({secs:.1f} s)") if parts else "none"


async def restart(suite: C.Suite, grace_s: float) -> float:
    """A new search process on the same Milvus data; a long grace period so embedded Milvus
    Lite closes cleanly (it flushes and finishes its index builds when it closes)."""
    t = time.perf_counter()
    suite.procs["search"].stop(grace_s)
    port = C.free_port()
    suite.procs["search"] = suite._start_search(f"search-{port}", port)
    await suite.procs["search"].wait_ready_async(600)
    return time.perf_counter() - t


async def run_arm(arm: str, args: argparse.Namespace, rows: list[list[Any]]) -> None:
    import grpc

    from mmsearch.search.v1 import search_pb2_grpc
    from tests.embedder.dashscope_fake import FakeDashScope

    fake = FakeDashScope(KEY, dimension=args.dim).start()
    suite = C.Suite(
        milvus=args.milvus, with_captioner=False, search_metrics=True,
        search_env={**arm_env(arm), **({"SEARCH_INDEX_TYPE": args.index} if args.index else {})},
        embedder_env={"EMBEDDER_BACKEND": "dashscope", "EMBEDDER_DASHSCOPE__API_KEY": KEY,
                      "EMBEDDER_DASHSCOPE__BASE_URL": fake.base_url, "EMBEDDER_DASHSCOPE__DIMENSION": str(args.dim),
                      "EMBEDDER_DASHSCOPE__MAX_CONCURRENT_CALLS": "16"})
    windows = [float(w) for w in args.windows.split(",")]
    label = f"{arm} ({args.index})" if args.index else arm
    try:
        await suite.start()
        total = 0
        for size in args.sizes:
            async with grpc.aio.insecure_channel(suite.search.address, options=C.CLIENT_OPTIONS) as ch:
                stub = search_pb2_grpc.SearchStub(ch)
                took, counts = await ingest(stub, total, size - total, args.max_side)
                ended = time.strftime("%H:%M:%S", time.gmtime())
                total = size
                after = await measure(stub, windows, args.dim, seed=size)
                flushed = flushes(suite)
            print(f"  {arm}: ingested {size} ({counts}) in {took:.1f} s, stream ended {ended} UTC; "
                  f"flushes {flushed}", flush=True)
            for line in flush_log(suite):
                print(f"    {line}", flush=True)
            restart_s = await restart(suite, args.grace_s)
            async with grpc.aio.insecure_channel(suite.search.address, options=C.CLIENT_OPTIONS) as ch:
                base = await measure(search_pb2_grpc.SearchStub(ch), [0, args.baseline_s], args.dim, seed=size + 1)
            base_p50 = {m: C.pct(base[0][m], 50) * 1000 for m in ("vector", "text")}
            for w in after:
                for mode in ("vector", "text"):
                    p50, p95 = C.pct(w[mode], 50) * 1000, C.pct(w[mode], 95) * 1000
                    rows.append([args.milvus, label, size, mode, f"{w['from']:g}-{w['to']:g} s", len(w[mode]), p50, p95,
                                 base_p50[mode], p50 / base_p50[mode], flushed])
            for mode in ("vector", "text"):
                rows.append([args.milvus, label, size, mode, f"after restart ({restart_s:.0f} s)", len(base[0][mode]),
                             base_p50[mode], C.pct(base[0][mode], 95) * 1000, base_p50[mode], 1.0, ""])
            print(C.table(HEADERS, rows[-(2 * len(after) + 2):]), flush=True)
    finally:
        suite.cleanup()
        fake.stop()


HEADERS = ["milvus", "policy", "rows", "mode", "when (after the stream ends)", "n", "p50 ms", "p95 ms",
           "after-restart p50 ms", "p50 / after-restart", "flushes so far (flush s)"]


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1600,20000", help="cumulative collection sizes to ingest up to")
    ap.add_argument("--arms", default="on,off", help="flush policy arms, run in this order")
    ap.add_argument("--milvus", default="embedded", choices=["embedded", "server"])
    ap.add_argument("--windows", default="0,5,15,30,60",
                    help="seconds after the stream ends bounding the measurement windows")
    ap.add_argument("--baseline-s", type=float, default=15.0, help="seconds of searches after the restart")
    ap.add_argument("--index", default="", help="SEARCH_INDEX_TYPE for the collection (default: the service's, HNSW)")
    ap.add_argument("--dim", type=int, default=384, help="vector dimension (the lite embedder's 384)")
    ap.add_argument("--max-side", type=int, default=48, help="side of the synthetic JPEGs")
    ap.add_argument("--grace-s", type=float, default=300.0, help="stop grace of the search process on restart")
    ap.add_argument("--quick", action="store_true", help="smoke: shorter baseline")
    args = ap.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    if args.quick:
        args.baseline_s = min(args.baseline_s, 3.0)
    C.header("Search right after ingest: flush policy (issue 17)")
    rows: list[list[Any]] = []
    for arm in args.arms.split(","):
        await run_arm(arm, args, rows)
    C.print_table("Search p50 right after the Ingest stream ends vs after a restart (same data)", HEADERS, rows)


if __name__ == "__main__":
    asyncio.run(main())
