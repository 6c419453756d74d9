"""Issue 21's search features against plain dense search, in the same run, alternating:
p50 / p99 client latency of each feature and its ratio to its baseline, at 10k and 100k
stored items.

Baselines: features that need no embedding (keyword by text, more like this, grouping,
decay, min_score, stored-id examples) against a dense `query_vector` search; the 3-leg
hybrid by text (image + caption + keyword: it embeds the text once) against a dense
search by the same text. Goals: keyword <= 1.3x, 3-leg hybrid <= 2x, more like this
<= 1.1x, grouping <= 1.5x.

The suite is embedder + search with a Milvus Lite server (no captioner: items carry
captions), SEARCH_INDEXED_FIELDS=label:string,price:float. Items (synthetic clustered
unit vectors of the embedder's dimension, captions of words from a small vocabulary,
labels of 1,000 products, prices) are written straight into the service's collection
through its own MilvusStore (the service's row layout, BM25 computed by Milvus), sizes
growing in one collection. Smoke runs on a shared embedded suite ingest a few items
through the Ingest API instead and skip what its collection lacks.

    python bench/search_features.py                       # 10k and 100k
    python bench/search_features.py --quick               # 2k
    python bench/search_features.py --sizes 10000 --n 200
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
import numpy as np

from bench import common as C
from mmsearch.client._convert import build_search_request
from mmsearch.client.types import Decay, ExampleId
from mmsearch.search.v1 import search_pb2, search_pb2_grpc

INDEXED = "label:string,price:float"
WORDS = ("amber", "basalt", "cobalt", "dune", "ember", "fjord", "glacier", "harbor", "indigo", "juniper", "kelp",
         "lagoon", "meadow", "nebula", "obsidian", "prairie", "quartz", "reef", "sierra", "tundra", "umber", "valley",
         "willow", "xenon", "yarrow", "zephyr")


def caption(j: int) -> tuple[str, list[str]]:
    rng = np.random.default_rng(j)
    words = [WORDS[int(k)] for k in rng.integers(0, len(WORDS), 6)]
    return f"item {j} " + " ".join(words) + f" code{j % 5000:04d}", [words[0], f"p{j % 1000}"]


async def load_direct(suite: C.Suite, start: int, stop: int, model_id: str, dim: int, batch: int) -> float:
    """Rows written straight into the service's collection with its own MilvusStore."""
    from services.search.milvus_store import MilvusStore, StoredRow
    from services.search.settings import SearchSettings

    store = MilvusStore(SearchSettings(milvus_uri=suite.milvus_uri, indexed_fields=INDEXED))  # type: ignore[arg-type]
    await store.ensure_collection(model_id, dim)
    t = time.perf_counter()
    for i in range(start, stop, batch):
        n = min(batch, stop - i)
        img = C.unit_vectors(n, dim, seed=i, clusters=256)
        cap = C.unit_vectors(n, dim, seed=i + 1, clusters=256)
        rows = []
        for j in range(i, i + n):
            text, keywords = caption(j)
            rows.append(StoredRow(
                id=f"f{j:08d}", content_sha256="0" * 64, fingerprint="f" * 64, uri=f"file:///photos/{j}.jpg",
                caption=text, keywords=keywords, metadata={"label": f"p{j % 1000}", "price": float(j % 500)},
                embedder_model_id=model_id, captioner_model_id="bench",
                ingested_at_ms=int(time.time() * 1000) - (stop - j) * 1000,
                image_vector=img[j - i], caption_vector=cap[j - i]))
        await store.upsert(rows)
    client = store._get_client()
    client.flush(store.collection)
    await store.close()
    return time.perf_counter() - t


async def load_ingest(stub: Any, start: int, stop: int) -> float:
    """Smoke runs: a few items through the Ingest API (caller captions, tiny images)."""
    from mmsearch.common.v1 import types_pb2

    jpegs = C.sample_jpegs(8, max_side=64)
    t = time.perf_counter()
    items = []
    for j in range(start, stop):
        text, keywords = caption(j)
        items.append(search_pb2.IngestItem(
            id=f"f{j:08d}", image=types_pb2.Image(data=jpegs[j % len(jpegs)]),
            caption=search_pb2.CaptionInput(description=text, keywords=keywords),
            metadata_json=f'{{"label": "p{j % 1000}", "price": {float(j % 500)}}}'))
    reqs = [search_pb2.IngestRequest(items=items[k:k + 16]) for k in range(0, len(items), 16)]
    await C.ingest_all(stub, reqs)
    return time.perf_counter() - t


def features(vecs: np.ndarray, size: int, indexed: bool) -> list[tuple[str, str, Any]]:
    """(name, baseline name, request factory(i)); "dense" and "dense text" are the baselines."""
    def word(i: int) -> str:
        return WORDS[i % len(WORDS)] + " " + WORDS[(i * 7 + 3) % len(WORDS)]

    def vec(i: int) -> list[float]:
        return vecs[i % len(vecs)].tolist()

    def stored(i: int) -> str:
        return f"f{(i * 7919) % size:08d}"

    out: list[tuple[str, str, Any]] = [
        ("dense", "", lambda i: build_search_request(vector=vec(i))),
        ("dense text", "", lambda i: build_search_request(word(i))),
        # Two of 26 vocabulary words: each is in ~21% of the captions, so BM25 scores a long
        # posting list (a worst case); a product code is in a handful of captions.
        ("keyword", "dense", lambda i: build_search_request(word(i), target="keyword")),
        ("keyword (a rare code)", "dense", lambda i: build_search_request(f"code{(i * 7919) % 5000:04d}",
                                                                         target="keyword")),
        ("hybrid 3 legs (RRF)", "dense text",
         lambda i: build_search_request(word(i), legs=["image", "caption", "keyword"])),
        ("hybrid 3 legs (weighted)", "dense text",
         lambda i: build_search_request(word(i), legs={"image": 0.5, "caption": 0.3, "keyword": 0.2})),
        ("more like this", "dense", lambda i: build_search_request(like=stored(i))),
        ("examples (2 ids, 1 negative)", "dense", lambda i: build_search_request(
            examples=[ExampleId(stored(i)), ExampleId(stored(i + 1)), (ExampleId(stored(i + 2)), -0.5)])),
        ("min_score", "dense", lambda i: build_search_request(vector=vec(i), min_score=0.1)),
        ("recency decay", "dense", lambda i: build_search_request(vector=vec(i), boost_recency="1d")),
    ]
    if indexed:
        out += [
            ("grouping (label, 1 per group)", "dense",
             lambda i: build_search_request(vector=vec(i), group_by="label", group_size=1)),
            ("decay on price", "dense",
             lambda i: build_search_request(vector=vec(i), decay=Decay(field="price", origin=250.0, scale=50.0))),
        ]
    return out


async def wait_text_search(stub: Any, timeout_s: float = 300) -> None:
    """Until the search service has bound the embedder (text queries answer)."""
    deadline = time.perf_counter() + timeout_s
    while True:
        try:
            await stub.Search(build_search_request("warm up"), timeout=60)
            return
        except grpc.aio.AioRpcError as e:
            if e.code() is not grpc.StatusCode.UNAVAILABLE or time.perf_counter() > deadline:
                raise
            await asyncio.sleep(0.5)


async def measure(stub: Any, feats: list[tuple[str, str, Any]], n: int) -> dict[str, list[float]]:
    """n rounds; each round calls every feature once, in turn (alternating)."""
    times: dict[str, list[float]] = {name: [] for name, _, _ in feats}
    for i in range(-3, n):  # 3 warm-up rounds
        for name, _, make in feats:
            req = make(max(i, 0))
            t = time.perf_counter()
            await stub.Search(req, timeout=120)
            if i >= 0:
                times[name].append((time.perf_counter() - t) * 1000)
    return times


async def main_async(args: argparse.Namespace) -> None:
    shared = C.shared()
    env = {"SEARCH_INDEXED_FIELDS": INDEXED, "SEARCH_MILVUS_TIMEOUT_S": "300", **dict(e.split("=", 1) for e in args.env)}
    rows: list[list[Any]] = []
    load_rows: list[list[Any]] = []
    async with C.Suite(milvus="server", with_captioner=False, search_env=env) as suite:
        direct = shared is None
        async with grpc.aio.insecure_channel(suite.search.address, options=C.CLIENT_OPTIONS) as channel:
            stub = search_pb2_grpc.SearchStub(channel)
            from mmsearch.embedder.v1 import embedder_pb2, embedder_pb2_grpc

            async with grpc.aio.insecure_channel(suite.procs["embedder"].address) as ch:
                info = await embedder_pb2_grpc.EmbedderStub(ch).Info(embedder_pb2.InfoRequest(), timeout=30)
            stats = await stub.Stats(search_pb2.StatsRequest(), timeout=60)
            indexed = {"label:string", "price:float"} <= set(stats.indexed_fields)
            vecs = C.unit_vectors(64, info.dimension, seed=99, clusters=256)
            have = 0
            for size in [int(x) for x in args.sizes.split(",")]:
                t0 = time.perf_counter()
                if direct:
                    took = await load_direct(suite, have, size, info.model_id, info.dimension, args.batch)
                else:
                    took = await load_ingest(stub, have, size)
                stats = await stub.Stats(search_pb2.StatsRequest(), timeout=60)
                # wait until the search service sees every row (index build on the server)
                while direct and stats.item_count < size and time.perf_counter() - t0 < 1800:
                    await asyncio.sleep(1)
                    stats = await stub.Stats(search_pb2.StatsRequest(), timeout=60)
                ready = time.perf_counter() - t0
                load_rows.append([size, size - have, "direct" if direct else "Ingest API", took, ready])
                print(f"{size}: loaded {size - have} rows in {took:.0f} s, searchable after {ready:.0f} s", flush=True)
                have = size
                feats = features(vecs, size, indexed)
                await wait_text_search(stub)
                t = time.perf_counter()
                times = await measure(stub, feats, args.n)
                print(f"  measured {args.n} rounds x {len(feats)} features in {time.perf_counter() - t:.0f} s",
                      flush=True)
                for name, base, _ in feats:
                    p50, p99 = C.pct(times[name], 50), C.pct(times[name], 99)
                    ratio = f"{p50 / C.pct(times[base], 50):.2f}x" if base else "baseline"
                    ratio99 = f"{p99 / C.pct(times[base], 99):.2f}x" if base else "-"
                    rows.append([size, name, base or "-", p50, p99, ratio, ratio99])
                if not indexed:
                    rows.append([size, "grouping, decay on price", "-", "-", "-", "skipped: no indexed fields", "-"])
    C.print_table("Load", ["rows", "added", "how", "write s", "searchable after s"], load_rows, digits=1)
    C.print_table(f"Search latency per feature, top_k 10, 1 client, {args.n} alternating rounds (ms)",
                  ["rows", "feature", "baseline", "p50 ms", "p99 ms", "p50 vs baseline", "p99 vs baseline"], rows)
    print("\ngoals: keyword <= 1.3x, 3-leg hybrid <= 2x, more like this <= 1.1x, grouping <= 1.5x (p50 vs baseline)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--n", type=int, default=100, help="rounds (each calls every feature once)")
    parser.add_argument("--batch", type=int, default=2000, help="rows per write")
    parser.add_argument("--quick", action="store_true", help="2k rows, 40 rounds")
    parser.add_argument("--env", action="append", default=[], help="extra SEARCH_*=value for the search process")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.n = "2000", 40
    C.header("Search features vs dense search")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
