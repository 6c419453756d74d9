"""Scale curve: search latency (p50, p99) and QPS against the number of stored items, on
embedded Milvus Lite (inside the search process) and on a Milvus Lite server (its own
process), with the insert and index build time of each size.

The collection is the service's own (MilvusStore schema, both vector fields, the
configured index), filled with synthetic unit vectors of the embedder's dimension by a
loader process that writes straight into Milvus (no embedding, no captions), then opened
by the search service exactly as in production. Queries are `query_vector` searches
through the Search RPC, so the embedder is out of the picture and the split is:
Milvus = the service's own `milvus_ms`; ours = client e2e - milvus_ms. In server mode the
same queries also go straight to Milvus from this process (pymilvus), as a baseline.

Sizes grow in one data directory (10k, then 90k more for 100k, ...). A size whose load
(insert + flush + index build) exceeds `--cap-minutes` is stopped and reported as such.

    python bench/search_scale.py                          # 10k and 100k, ~5 min on 2 vCPU
    python bench/search_scale.py --quick                  # 2k and 10k
    python bench/search_scale.py --sizes 10000,100000,1000000 --cap-minutes 30
    python bench/search_scale.py --index FLAT --sizes 1000000    # skip the HNSW build
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import grpc
import numpy as np

from bench import common as C
from mmsearch.common.v1 import types_pb2
from mmsearch.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from mmsearch.search.v1 import search_pb2, search_pb2_grpc
from mmsearch.suite import ManagedProcess, milvus_spec, service_spec

COLLECTION = "mmsearch"


# --- loader (runs in a child process: it owns the embedded Milvus Lite while it writes) ----

def load(data_dir: str, start: int, stop: int, model_id: str, dim: int, index: str, batch: int) -> None:
    from services.common.principal import DEFAULT_TENANT
    from services.search import fields as F
    from services.search.milvus_store import MilvusStore
    from services.search.settings import SearchSettings

    settings = SearchSettings(milvus_uri=data_dir, collection=COLLECTION, index_type=index)  # type: ignore[arg-type]
    store = MilvusStore(settings)
    asyncio.run(store.ensure_collection(model_id, dim))
    client = store._get_client()
    t = time.perf_counter()
    for i in range(start, stop, batch):
        n = min(batch, stop - i)
        img = C.unit_vectors(n, dim, seed=i, clusters=256)
        cap = C.unit_vectors(n, dim, seed=i + 1, clusters=256)
        rows = [{
            "id": f"s{j:08d}", "content_sha256": "0" * 64, "fingerprint": "f" * 64, "uri": f"file:///photos/{j}.jpg",
            "caption": f"synthetic item {j}", "keywords": ["bench", f"k{j % 100}"], "metadata": {"n": j % 1000},
            "embedder_model_id": model_id, "captioner_model_id": "bench", "ingested_at_ms": 1_760_000_000_000 + j,
            F.IMAGE_VECTOR: img[j - i], F.CAPTION_VECTOR: cap[j - i],
            F.KEYWORD_TEXT: f"synthetic item {j} bench k{j % 100}",  # the BM25 function's input
            F.TENANT: DEFAULT_TENANT,
        } for j in range(i, i + n)]
        client.insert(COLLECTION, rows)
    insert_s = time.perf_counter() - t
    t = time.perf_counter()
    client.flush(COLLECTION)
    from milvus_lite.server_manager import server_manager_instance

    db = server_manager_instance._servers[os.path.abspath(data_dir)][1]
    col = db.get_collection(COLLECTION)
    col._wait_for_bg()
    index_s = time.perf_counter() - t
    segs = col._segments_snapshot()
    kinds = sorted({type(s.indexes.get(F.IMAGE_VECTOR)).__name__ for s in segs})
    print(json.dumps({"insert_s": insert_s, "index_s": index_s, "rows": int(col.num_entities),
                      "segments": len(segs), "index_kinds": kinds}))
    sys.stdout.flush()
    os._exit(0)  # skip Milvus Lite's atexit work (already flushed)


# --- measurement ---------------------------------------------------------------------------


async def wait_ready(stub: Any, vec: np.ndarray, proc: ManagedProcess, timeout_s: float = 600) -> float:
    started = time.perf_counter()
    req = search_pb2.SearchRequest(query_vector=types_pb2.Embedding(values=vec.tolist()), top_k=10)
    while time.perf_counter() - started < timeout_s:
        if not proc.alive:
            raise RuntimeError("search exited:\n" + "\n".join(proc.tail()))
        try:
            await stub.Search(req, timeout=120)
            return time.perf_counter() - started
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.5)
    raise TimeoutError("search not ready:\n" + "\n".join(proc.tail()))


async def measure(address: str, vecs: np.ndarray, n: int, qps_s: float, clients: int, proc: ManagedProcess,
                  ) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(address, options=C.CLIENT_OPTIONS) as channel:
        stub = search_pb2_grpc.SearchStub(channel)
        ready_s = await wait_ready(stub, vecs[0], proc)
        reqs = [search_pb2.SearchRequest(query_vector=types_pb2.Embedding(values=v.tolist()), top_k=10) for v in vecs]
        for r in reqs[:3]:
            await stub.Search(r, timeout=120)
        e2e, milvus = [], []
        for i in range(n):
            t = time.perf_counter()
            reply = await stub.Search(reqs[i % len(reqs)], timeout=120)
            e2e.append((time.perf_counter() - t) * 1000)
            milvus.append(reply.timings.milvus_ms)
        done = 0

        async def call(i: int) -> None:
            nonlocal done
            await stub.Search(reqs[i % len(reqs)], timeout=120)
            done += 1

        t = time.perf_counter()
        await C.closed_loop(call, clients, t + qps_s)
        qps = done / (time.perf_counter() - t)
    ours = [a - b for a, b in zip(e2e, milvus, strict=True)]
    return {"ready_s": ready_s, "e2e": e2e, "milvus": milvus, "ours": ours, "qps": qps}


def direct_milvus(uri: str, vecs: np.ndarray, n: int) -> list[float]:
    """The same searches straight to the Milvus server with pymilvus (what the service sends)."""
    from pymilvus import MilvusClient

    from services.search import fields as F
    from services.search.milvus_store import MilvusStore
    from services.search.settings import SearchSettings

    params = MilvusStore(SearchSettings())._search_params(10)
    client = MilvusClient(uri=uri, timeout=120)
    out_fields = list(F.OUTPUT_FIELDS.values())
    times = []
    for i in range(n + 3):
        t = time.perf_counter()
        client.search(COLLECTION, data=[vecs[i % len(vecs)]], anns_field=F.IMAGE_VECTOR, limit=10,
                      output_fields=out_fields, search_params=params)
        if i >= 3:
            times.append((time.perf_counter() - t) * 1000)
    client.close()
    return times


async def main_async(args: argparse.Namespace) -> None:
    workdir = Path(args.workdir or __import__("tempfile").mkdtemp(prefix="mmsearch-scale-"))
    data = workdir / "milvus-data.db"  # a .db path: pymilvus embeds Milvus Lite; also its --data-dir
    py = sys.executable
    shared = C.shared()
    if shared is not None:  # smoke runs reuse the running suite's embedder
        embedder = shared.procs["embedder"]
    else:
        embedder = C.start_process(service_spec("embedder", C.free_port(), {"EMBEDDER_LOG_LEVEL": "WARNING"}),
                                   workdir)
    build_rows: list[list[Any]] = []
    rows: list[list[Any]] = []
    try:
        await embedder.wait_ready_async(300)
        async with grpc.aio.insecure_channel(embedder.address) as ch:
            info = await embedder_pb2_grpc.EmbedderStub(ch).Info(embedder_pb2.InfoRequest(), timeout=30)
        vecs = C.unit_vectors(64, info.dimension, seed=99, clusters=256)
        have = 0
        for size in [int(x) for x in args.sizes.split(",")]:
            t = time.perf_counter()
            proc = await asyncio.to_thread(
                subprocess.run,
                [py, __file__, "--_load", str(data), str(have), str(size), info.model_id, str(info.dimension),
                 args.index, str(args.batch)],
                cwd=C.ROOT, capture_output=True, text=True, timeout=args.cap_minutes * 60, check=False,
            ) if size > have else None
            if proc is not None and proc.returncode != 0:
                print(proc.stdout[-2000:], proc.stderr[-3000:])
                raise RuntimeError(f"loader failed for {size}")
            stats = json.loads(proc.stdout.strip().splitlines()[-1]) if proc else {}
            print(f"{size}: loaded {size - have} rows in {time.perf_counter() - t:.0f} s: {stats}", flush=True)
            build_rows.append([size, size - have, stats.get("insert_s", 0.0),
                               (size - have) / stats["insert_s"] if stats.get("insert_s") else float("nan"),
                               stats.get("index_s", 0.0), stats.get("segments", "-"),
                               ",".join(stats.get("index_kinds", []))])
            have = size
            for mode in [m for m in args.milvus.split(",") if m]:
                procs: list[ManagedProcess] = []
                try:
                    if mode == "server":
                        server = C.start_process(milvus_spec(data, C.free_port()), workdir)
                        procs.append(server)
                        await server.wait_ready_async(120)
                        uri = f"http://{server.address}"
                    else:
                        uri = str(data)
                    search = C.start_process(service_spec("search", C.free_port(), {
                        "SEARCH_LOG_LEVEL": "WARNING", "SEARCH_MILVUS_URI": uri, "SEARCH_COLLECTION": COLLECTION,
                        "SEARCH_EMBEDDER_TARGET": embedder.address, "SEARCH_CAPTIONER_TARGET": f"127.0.0.1:{C.free_port()}",
                        "SEARCH_MILVUS_TIMEOUT_S": "300", "SEARCH_INDEX_TYPE": args.index},
                        name=f"search-{mode}-{size}"), workdir)  # measure() times its start-up
                    procs.append(search)
                    n = max(30, min(args.n, int(args.n * 10_000 / size))) if args.adaptive else args.n
                    r = await measure(search.address, vecs, n, args.qps_seconds, args.clients, search)
                    direct = direct_milvus(uri, vecs, n) if mode == "server" else []
                    rows.append([
                        size, mode, n, C.pct(r["e2e"], 50), C.pct(r["e2e"], 99), C.pct(r["milvus"], 50),
                        C.pct(direct, 50) if direct else float("nan"), C.pct(r["ours"], 50), C.pct(r["ours"], 99),
                        r["qps"], r["ready_s"],
                    ])
                    print(f"  {mode}: p50 {rows[-1][3]:.1f} ms (milvus {rows[-1][5]:.1f}, ours {rows[-1][7]:.2f}),"
                          f" QPS {r['qps']:.1f}, ready after {r['ready_s']:.1f} s", flush=True)
                finally:
                    for p in reversed(procs):
                        p.stop()
    except subprocess.TimeoutExpired as e:
        print(f"load stopped at the {args.cap_minutes:.0f}-minute cap: {e}")
        build_rows.append([f"{e.cmd[4] if isinstance(e.cmd, list) else '?'}", "-", "cap reached", "-", "-", "-", "-"])
    finally:
        if shared is None:
            embedder.stop()
        if not args.workdir:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    C.print_table(f"Load: synthetic rows (2 x {args.index} vector fields, dim from the embedder), batches of {args.batch}",
                  ["total rows", "added", "insert s", "rows/s", "flush + index build s", "segments", "index kind"],
                  build_rows, digits=1)
    C.print_table(f"Search by query_vector, top_k 10, all output fields; latency from 1 client, QPS from {args.clients}",
                  ["rows", "milvus", "queries", "e2e p50 ms", "e2e p99 ms", "milvus_ms p50", "pymilvus direct p50",
                   "ours p50 ms", "ours p99 ms", "QPS", "start-up s"], rows)
    print("\nmilvus_ms = the service's own Milvus call; ours = client e2e - milvus_ms;"
          " pymilvus direct = the same search from this process straight to the Milvus Lite server.")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_load":
        d, a, b, model, dim, index, batch = sys.argv[2:9]
        load(d, int(a), int(b), model, int(dim), index, int(batch))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--milvus", default="embedded,server")
    parser.add_argument("--index", default=None, help="index type (default: SearchSettings().index_type)")
    parser.add_argument("--n", type=int, default=100, help="sequential queries per point (fewer, down to 30, at large sizes)")
    parser.add_argument("--no-adaptive", dest="adaptive", action="store_false",
                        help="always --n queries (by default n shrinks as 1/size above 10k rows, to 30 at least)")
    parser.add_argument("--qps-seconds", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--cap-minutes", type=float, default=20.0, help="per size: load time cap")
    parser.add_argument("--workdir", help="keep the data here (default: a temp dir, removed)")
    parser.add_argument("--quick", action="store_true", help="2k and 10k rows, fewer queries")
    args = parser.parse_args()
    if args.index is None:
        from services.search.settings import SearchSettings

        args.index = SearchSettings().index_type
    if args.quick:
        args.sizes, args.n, args.qps_seconds = "2000,10000", 40, 4.0
    C.header("Scale curve")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
