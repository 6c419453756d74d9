"""Index quality: recall@10 of HNSW and IVF_FLAT against exact search on the same vectors,
with the search-time knob swept to show the latency cost of recall.

Vectors are synthetic, L2-normalised, of the embedder's dimension (384 by default),
clustered around random centres (closer to real embeddings than uniform noise and harder
for IVF); queries come from the same distribution. Ground truth is brute-force numpy
cosine top-k. Each index is built by Milvus Lite embedded in this process with the build
parameters `services.search.settings.SearchSettings` configures, and searched with the
search parameters `MilvusStore` sends (HNSW ef = max(SEARCH_HNSW_EF, offset + top_k),
IVF nprobe = SEARCH_IVF_NPROBE), so a change of defaults shows up here.

It also checks what Milvus Lite really does with the index request: `describe_index`
only echoes the request (state is always "Finished"), so the per-segment index objects
inside Milvus Lite are inspected too (FAISS IndexHNSWFlat / IndexIVFFlat, or brute force).

    python bench/search_recall.py                  # 100k vectors, ~4 min on 2 vCPU
    python bench/search_recall.py --quick          # 20k vectors, ~1 min
    python bench/search_recall.py --n 100000 --hnsw-ef 64,128,256 --ivf-nprobe 16,32,64,128
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np

from bench import common as C
from services.search.milvus_store import MilvusStore
from services.search.settings import SearchSettings

FIELD = "image_vector"


SUBJECTS = ["cat", "dog", "red car", "old bicycle", "cup of coffee", "wooden table", "mountain lake", "city street",
            "rocket", "pink flower", "temple", "brick wall", "wall clock", "galaxy", "astronaut", "horse", "sailboat",
            "bowl of soup", "green parrot", "laptop", "guitar", "lighthouse", "snowy forest", "desert road",
            "bridge", "child", "old man", "chef", "football player", "train station", "market stall", "pizza",
            "camera", "umbrella", "butterfly", "tiger", "elephant", "wedding dress", "library", "motorcycle"]
ADJECTIVES = ["", "small", "large", "vintage", "colourful", "blurry", "dark", "bright", "black and white", "tiny",
              "rusty", "modern", "wet", "shiny", "dusty", "famous"]
PLACES = ["on a sofa", "in the rain", "at night", "on the beach", "in a kitchen", "in a park", "under a tree",
          "next to a window", "in the snow", "on a table", "in a museum", "at sunset", "in a garden", "on a street",
          "in the mountains", "near a river", "in an office", "on a boat", "in a forest", "in the desert"]
STYLES = ["a photo of", "a close-up of", "a painting of", "a picture of", "a drawing of", "an image of",
          "a sketch of", "a snapshot of"]


def minilm_vectors(n: int, seed: int) -> np.ndarray:
    """Real text embeddings (the lite embedder's MiniLM) of n distinct generated captions,
    cached in the temp dir: the geometry of real embeddings, not synthetic noise."""
    cache = Path(tempfile.gettempdir()) / f"mmsearch-bench-minilm-{n}-{seed}.npy"
    if cache.exists():
        return np.load(cache)
    rng = np.random.default_rng(seed)
    seen: set[str] = set()
    texts: list[str] = []
    while len(texts) < n:
        a, b, c, d = (rng.integers(len(x)) for x in (STYLES, ADJECTIVES, SUBJECTS, PLACES))
        text = " ".join(w for w in (STYLES[a], ADJECTIVES[b], SUBJECTS[c], PLACES[d]) if w)
        if rng.random() < 0.5:
            text += f", {rng.integers(1, 60)} seconds exposure" if rng.random() < 0.5 else f", item {rng.integers(1_000_000)}"
        if text not in seen:
            seen.add(text)
            texts.append(text)
    from services.lite_models.minilm import MiniLMTextEncoder

    t = time.perf_counter()
    vectors = MiniLMTextEncoder(batch_size=256).encode(texts)
    print(f"encoded {n} generated captions with MiniLM in {time.perf_counter() - t:.0f} s (cached in {cache})")
    np.save(cache, vectors)
    return vectors


def exact_topk(data: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    scores = queries @ data.T  # cosine: both sides are unit vectors
    idx = np.argpartition(-scores, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, idx, axis=1), axis=1)
    return np.take_along_axis(idx, order, axis=1)


def lite_collection(uri: str, name: str) -> Any:
    """The Milvus Lite Collection object behind an embedded client (for inspection only)."""
    import os

    from milvus_lite.server_manager import server_manager_instance

    _server, db, _port = server_manager_instance._servers[os.path.abspath(uri)]
    return db.get_collection(name)


def inspect(col: Any) -> str:
    kinds: dict[str, int] = {}
    for seg in col._segments_snapshot():
        idx = seg.indexes.get(FIELD)
        if idx is None:
            kind = "none (brute force)"
        else:
            inner = getattr(idx, "_index", None)
            kind = type(idx).__name__ + (f"/{type(inner).__name__}" if inner is not None else "")
            if inner is not None and hasattr(inner, "hnsw"):  # level >= 1 keeps M links per node
                kind += f"(M={inner.hnsw.nb_neighbors(1)}, efConstruction={inner.hnsw.efConstruction})"
            if inner is not None and hasattr(inner, "nlist"):
                kind += f"(nlist={inner.nlist})"
        kinds[kind] = kinds.get(kind, 0) + seg.num_rows
    mem = col._memtable.size() if hasattr(col, "_memtable") else 0
    parts = [f"{rows} rows in {kind}" for kind, rows in kinds.items()]
    if mem:
        parts.append(f"{mem} rows in the memtable (brute force)")
    return "; ".join(parts)


def create(client: Any, name: str, data: np.ndarray, batch: int) -> float:
    """One collection for every index: the rows are inserted once, indexes are swapped."""
    from pymilvus import DataType

    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field(FIELD, DataType.FLOAT_VECTOR, dim=data.shape[1])
    client.create_collection(name, schema=schema)
    t = time.perf_counter()
    for i in range(0, len(data), batch):
        client.insert(name, [{"id": j, FIELD: data[j]} for j in range(i, min(i + batch, len(data)))])
    client.flush(name)
    return time.perf_counter() - t


def build(client: Any, uri: str, name: str, settings: SearchSettings, before_fix: bool) -> dict[str, Any]:
    """(Re)builds the vector index with the build params the service sends. `before_fix`
    sends them the way MilvusStore did before it also sent the legacy `params` key
    (pymilvus flattens them, Milvus Lite 3.x ignores flattened keys)."""
    store = MilvusStore(settings)
    params = store._index_params() if before_fix else store._index_request_params()
    if client.list_indexes(name):
        client.release_collection(name)
        client.drop_index(name, FIELD)
    index = client.prepare_index_params()
    index.add_index(FIELD, index_type=settings.index_type, metric_type=settings.metric_type, params=params)
    t = time.perf_counter()
    client.create_index(name, index)
    client.load_collection(name)
    col = lite_collection(uri, name)
    col._wait_for_bg()
    index_s = time.perf_counter() - t
    described = client.describe_index(name, FIELD) or {}
    return {"index_s": index_s, "inside": inspect(col), "described": described, "asked": store._index_params()}


def run_searches(client: Any, name: str, queries: np.ndarray, k: int, params: dict[str, Any],
                 ) -> tuple[np.ndarray, list[float]]:
    found = np.full((len(queries), k), -1, dtype=np.int64)
    times = []
    for _ in range(3):  # warm-up
        client.search(name, data=[queries[0]], anns_field=FIELD, limit=k, search_params=params)
    for qi, q in enumerate(queries):
        t = time.perf_counter()
        res = client.search(name, data=[q], anns_field=FIELD, limit=k, search_params=params)
        times.append(time.perf_counter() - t)
        ids = [h["id"] for h in res[0]]
        found[qi, : len(ids)] = ids
    return found, times


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--data", default="clustered", choices=["clustered", "uniform", "minilm"],
                        help="synthetic clustered vectors, uniform random ones (the worst case for ANN), or"
                             " real MiniLM text embeddings of generated captions (encoding 100k takes minutes)")
    parser.add_argument("--clusters", type=int, default=256, help="centres of the clustered data")
    parser.add_argument("--hnsw-ef", default="", help="comma list of ef values (default: 32,64,<default>,256)")
    parser.add_argument("--ivf-nprobe", default="", help="comma list (default: 8,<default>,64,128)")
    parser.add_argument("--indexes", default="FLAT,HNSW,IVF_FLAT",
                        help="comma list; IVF_FLAT:before-fix / HNSW:before-fix send the build params the old way")
    parser.add_argument("--batch", type=int, default=5000, help="rows per insert call")
    parser.add_argument("--quick", action="store_true", help="20k vectors, 50 queries")
    args = parser.parse_args()
    if args.quick:
        args.n, args.queries = 20_000, 50
    defaults = SearchSettings()
    efs = [int(x) for x in args.hnsw_ef.split(",") if x] or sorted({32, 64, defaults.hnsw_ef, 256})
    nprobes = [int(x) for x in args.ivf_nprobe.split(",") if x] or sorted({8, defaults.ivf_nprobe, 64, 128})
    C.header("Index quality: recall@k against exact search")
    print(f"defaults: HNSW M={defaults.hnsw_m} efConstruction={defaults.hnsw_ef_construction} ef={defaults.hnsw_ef};"
          f" IVF_FLAT nlist={defaults.ivf_nlist} nprobe={defaults.ivf_nprobe}; metric {defaults.metric_type}")

    # Queries are fresh draws from the same distribution (not copies of stored points).
    if args.data == "minilm":
        both = minilm_vectors(args.n + args.queries, seed=11)
        args.dim = both.shape[1]
    else:
        both = C.unit_vectors(args.n + args.queries, args.dim, seed=11,
                              clusters=args.clusters if args.data == "clustered" else 0)
    data, queries = both[: args.n], both[args.n :]
    t = time.perf_counter()
    truth = exact_topk(data, queries, args.k)
    numpy_ms = (time.perf_counter() - t) * 1000 / args.queries
    what = {"clustered": f"synthetic, {args.clusters} clusters", "uniform": "synthetic, uniform on the sphere",
            "minilm": "MiniLM embeddings of generated captions"}[args.data]
    print(f"{args.n} x {args.dim} vectors ({what}); exact numpy top-{args.k}: {numpy_ms:.2f} ms/query")

    from pymilvus import MilvusClient

    tmp = Path(tempfile.mkdtemp(prefix="mmsearch-recall-"))
    uri = str(tmp / "recall.db")
    client = MilvusClient(uri=uri, timeout=600)
    name = "recall"
    insert_s = create(client, name, data, args.batch)
    print(f"inserted {args.n} rows in {insert_s:.1f} s ({args.n / insert_s:.0f} rows/s)", flush=True)
    rows: list[list[Any]] = []
    builds: list[list[Any]] = []
    flat_p50 = float("nan")
    for spec in [x for x in args.indexes.split(",") if x]:
        index_type, _, variant = spec.partition(":")
        before_fix = variant == "before-fix"
        settings = defaults.model_copy(update={"index_type": index_type})
        b = build(client, uri, name, settings, before_fix)
        described = b["described"]
        builds.append([spec, b["index_s"], b["asked"] or "-",
                       described.get("params", {k: v for k, v in described.items() if k in b["asked"]}) or "-",
                       b["inside"]])
        print(f"{spec}: index {b['index_s']:.1f} s; inside: {b['inside']}", flush=True)
        if index_type == "HNSW":
            sweep = [("ef", ef, defaults.model_copy(update={"index_type": "HNSW", "hnsw_ef": ef})) for ef in efs]
        elif index_type == "IVF_FLAT":
            sweep = [("nprobe", p, defaults.model_copy(update={"index_type": "IVF_FLAT", "ivf_nprobe": p}))
                     for p in nprobes]
        else:
            sweep = [("-", "-", settings)]
        for knob, value, s in sweep:
            params = MilvusStore(s)._search_params(args.k)
            found, times = run_searches(client, name, queries, args.k, params)
            st = C.summary_ms(times)
            if index_type == "FLAT":
                flat_p50 = st["p50"]
            is_default = (index_type == "HNSW" and value == defaults.hnsw_ef) or (
                index_type == "IVF_FLAT" and value == defaults.ivf_nprobe)
            label = "-" if knob == "-" else f"{knob}={value}" + (" (default)" if is_default else "")
            rows.append([spec, label, recall(found, truth),
                         st["p50"], st["p99"], st["p50"] / flat_p50 if not math.isnan(flat_p50) else float("nan")])
            print(f"  {rows[-1][1]}: recall@{args.k} {rows[-1][2]:.4f}, p50 {st['p50']:.2f} ms", flush=True)
    client.close()
    C.release_embedded_milvus(uri)
    shutil.rmtree(tmp, ignore_errors=True)
    C.print_table(f"Index build on {args.n} x {args.dim} (inserted once in {insert_s:.0f} s)",
                  ["index", "build s", "configured build params", "describe_index params",
                   "what Milvus Lite built (per segment)"], builds)
    C.print_table(f"recall@{args.k} vs exact (numpy), {what}, {args.queries} queries, 1 client, Milvus Lite embedded",
                  ["index", "search param", f"recall@{args.k}", "p50 ms", "p99 ms", "p50 / FLAT p50"], rows, digits=3)
    print(f"\nexact numpy brute force for reference: {numpy_ms:.2f} ms/query (matrix product, no Milvus)")


if __name__ == "__main__":
    main()
