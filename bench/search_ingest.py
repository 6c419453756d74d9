"""Ingest pipelining: the end-to-end Search.Ingest rate against each stage alone, on the
same images, in the same run.

Stages alone (each with the concurrency / batching the pipeline itself uses):
  decode   header check (decode too with SEARCH_DECODE_ON_INGEST) + SHA-256 in
           `SEARCH_DECODE_WORKERS` threads (the function the pipeline runs), in this process;
  caption  Captioner.Caption RPCs, `SEARCH_CAPTION_CONCURRENCY` in flight;
  embed    Embedder.Embed RPCs of `SEARCH_EMBED_BATCH_ITEMS` images + their caption texts,
           2 in flight (as the pipeline sends them);
  upsert   MilvusStore.upsert of `SEARCH_UPSERT_BATCH_ITEMS` rows with the stage's real
           vectors, into a scratch collection of the same Milvus (embedded: a Milvus Lite
           file opened in this process; server: the same server).
End to end: one Search.Ingest stream of all images into an empty collection; then the same
stream again (every item UNCHANGED: the idempotent re-run path).

Goal: end-to-end >= 0.8x the slowest stage. On a CPU-only box the caption and embed
stages run the same kind of CNN on the same cores, so they cannot overlap in CPU time; the
table therefore also gives the "no overlap" rate 1 / sum(1 / stage rate) and the CPU
seconds each process spent during the end-to-end run. The run is repeated with
caller-supplied captions (no caption stage), the mode where the stages use different
resources. The captioner's cache is off so that every caption is paid for.

    python bench/search_ingest.py                 # 120 images, ~5 min on 2 vCPU
    python bench/search_ingest.py --quick         # 48 images, ~1.5 min
    python bench/search_ingest.py --milvus server --images 400
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import grpc

from bench import common as C
from mmsearch.captioner.v1 import captioner_pb2, captioner_pb2_grpc
from mmsearch.common.v1 import types_pb2
from mmsearch.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from mmsearch.search.v1 import search_pb2_grpc
from services.common.intake import ImageIntake
from services.search.ingest import caption_text
from services.search.settings import SearchSettings
from services.search.upstreams import CaptionResult


def stage_decode(jpegs: list[bytes], s: SearchSettings) -> float:
    from services.search.ingest import _inspect

    intake = ImageIntake(s.images, s.uris)
    with ThreadPoolExecutor(s.decode_workers) as pool:
        list(pool.map(lambda d: _inspect(d, intake, s.decode_on_ingest), jpegs[:8]))  # warm-up
        t = time.perf_counter()
        list(pool.map(lambda d: _inspect(d, intake, s.decode_on_ingest), jpegs))
        return len(jpegs) / (time.perf_counter() - t)


def decode_variants(jpegs: list[bytes], s: SearchSettings, rounds: int = 3) -> list[list[Any]]:
    """Search's own image check, CPU ms per item: the header check it ships with against
    the decode it did before issue 13 (SEARCH_DECODE_ON_INGEST=true), alternating rounds,
    one thread (process CPU time, so other load on the box does not count)."""
    from services.search.ingest import _inspect

    intake = ImageIntake(s.images, s.uris)
    cpu: dict[bool, list[float]] = {False: [], True: []}
    for r in range(rounds):
        for decode in ((False, True) if r % 2 == 0 else (True, False)):
            t = time.process_time()
            for d in jpegs:
                _inspect(d, intake, decode)
            cpu[decode].append((time.process_time() - t) / len(jpegs) * 1000)
    header, full = float(np.median(cpu[False])), float(np.median(cpu[True]))
    return [["header check (shipped)", header, header / full], ["decode at 1/8 scale (before)", full, 1.0]]


async def stage_caption(address: str, jpegs: list[bytes], s: SearchSettings) -> tuple[float, list[CaptionResult]]:
    async with grpc.aio.insecure_channel(address, options=C.CLIENT_OPTIONS) as channel:
        stub = captioner_pb2_grpc.CaptionerStub(channel)
        sem = asyncio.Semaphore(s.caption_concurrency)

        async def one(data: bytes) -> CaptionResult:
            async with sem:
                r = await stub.Caption(captioner_pb2.CaptionRequest(image=types_pb2.Image(data=data)), timeout=120)
                return CaptionResult(r.caption.description, list(r.caption.keywords), r.caption.model_id)

        t = time.perf_counter()
        captions = await asyncio.gather(*(one(d) for d in jpegs))
        return len(jpegs) / (time.perf_counter() - t), list(captions)


async def stage_embed(address: str, jpegs: list[bytes], captions: list[CaptionResult], s: SearchSettings,
                      pid: int | None = None) -> tuple[float, list[Any], str, float]:
    """Returns (items/s, per-item [2, dim] vectors, model id, embedder CPU s per item
    after the warm-up call, when `pid` is given)."""
    async with grpc.aio.insecure_channel(address, options=C.CLIENT_OPTIONS) as channel:
        stub = embedder_pb2_grpc.EmbedderStub(channel)
        b = s.embed_batch_items
        batches = []
        for i in range(0, len(jpegs), b):
            items = []
            for data, cap in zip(jpegs[i : i + b], captions[i : i + b], strict=True):
                items += [types_pb2.Content(image=types_pb2.Image(data=data)), types_pb2.Content(text=caption_text(cap))]
            batches.append(embedder_pb2.EmbedRequest(items=items))
        await stub.Embed(batches[0], timeout=120)  # warm-up
        cpu0 = C.cpu_seconds(pid) if pid else 0.0
        sem = asyncio.Semaphore(2)
        vectors: list[Any] = [None] * len(batches)

        async def one(k: int) -> None:
            async with sem:
                r = await stub.Embed(batches[k], timeout=300)
                vectors[k] = r

        t = time.perf_counter()
        await asyncio.gather(*(one(k) for k in range(len(batches))))
        rate = len(jpegs) / (time.perf_counter() - t)
        cpu = (C.cpu_seconds(pid) - cpu0) / len(jpegs) if pid else float("nan")

        flat = np.concatenate([np.array([e.values for e in r.embeddings], dtype=np.float32) for r in vectors])
        return rate, [flat[2 * i : 2 * i + 2] for i in range(len(jpegs))], vectors[0].model_id, cpu


async def stage_upsert(milvus_uri: str, vecs: list[Any], model_id: str, captions: list[CaptionResult],
                       s: SearchSettings) -> float:
    from services.search.milvus_store import MilvusStore, StoredRow

    store = MilvusStore(SearchSettings(milvus_uri=milvus_uri, collection=f"bench_upsert_{uuid.uuid4().hex[:8]}"))
    try:
        await store.ensure_collection(model_id, int(vecs[0].shape[1]))
        now = int(time.time() * 1000)
        rows = [StoredRow(id=f"u{i}", content_sha256="0" * 64, fingerprint="f" * 64, uri="", caption=c.description,
                          keywords=c.keywords[:16], metadata={}, embedder_model_id=model_id,
                          captioner_model_id=c.model_id, ingested_at_ms=now, image_vector=v[0], caption_vector=v[1])
                for i, (v, c) in enumerate(zip(vecs, captions, strict=True))]
        await store.upsert([StoredRow(**{**r.__dict__, "id": "warm"}) for r in rows[:1]])
        b = s.upsert_batch_items
        t = time.perf_counter()
        for i in range(0, len(rows), b):
            await store.upsert(rows[i : i + b])
        return len(rows) / (time.perf_counter() - t)
    finally:
        await store.close()


async def e2e(stub: Any, requests: list[Any], pids: dict[str, int]) -> tuple[float, dict[str, int], dict[str, float]]:
    cpu0 = {k: C.cpu_seconds(p) for k, p in pids.items()}
    t = time.perf_counter()
    counts = await C.ingest_all(stub, requests, timeout_s=1800)
    wall = time.perf_counter() - t
    n = sum(counts.values())
    cpu = {k: C.cpu_seconds(p) - cpu0[k] for k, p in pids.items()}
    return n / wall, counts, {**cpu, "wall": wall}


def stage_seconds(port: int) -> dict[str, float]:
    """Busy seconds per stage so far, plus the number of Embed calls ("embed_calls")."""
    m = C.scrape_metrics(port)
    out = {dict(labels)["stage"]: v for (name, labels), v in m.items() if name == "search_ingest_stage_seconds_sum"}
    out["embed_calls"] = sum(v for (name, labels), v in m.items()
                             if name == "search_ingest_stage_seconds_count" and dict(labels).get("stage") == "embed")
    return out


async def run(milvus: str, args: argparse.Namespace) -> tuple[list[list[Any]], list[list[Any]], list[list[Any]]]:
    s = SearchSettings(**{k.removeprefix('SEARCH_').lower(): v for k, v in args.search_env.items()})
    jpegs = C.sample_jpegs(args.images, max_side=args.max_side, seed=1)
    other = C.sample_jpegs(args.images, max_side=args.max_side, seed=2)  # distinct bytes for the 2nd e2e run
    rows: list[list[Any]] = []
    where: list[list[Any]] = []
    cpu_rows: list[list[Any]] = []
    remote = C.FakeVisionLLM(args.remote_captioner_ms / 1000) if args.remote_captioner_ms else None
    async with C.Suite(milvus=milvus, search_metrics=True,
                       captioner_env={"CAPTIONER_CACHE_SIZE": "0", **(remote.env() if remote else {}),
                                      **args.captioner_env},
                       embedder_env=args.embedder_env, search_env=args.search_env) as suite:
        pids = {k: p.pid for k, p in suite.procs.items()}
        me = os.getpid()
        cpu: dict[str, float] = {}  # CPU seconds per item, each stage alone

        async def alone(stage: str, pid: int, coro: Any) -> Any:
            c0 = C.cpu_seconds(pid)
            result = await coro
            cpu[stage] = (C.cpu_seconds(pid) - c0) / len(jpegs)
            return result

        t_dec = await alone("decode", me, asyncio.to_thread(stage_decode, jpegs, s))
        t_cap, captions = await alone("caption", pids["captioner"],
                                      stage_caption(suite.procs["captioner"].address, jpegs, s))
        emb = suite.procs["embedder"].address
        t_emb, vecs, model_id, cpu["embed"] = await stage_embed(emb, jpegs, captions, s, pids["embedder"])
        # The same stage with one image (+ its caption) per Embed call: what small batches cost.
        n1 = min(len(jpegs), args.single_items)
        t_emb1, _, _, cpu_emb1 = await stage_embed(emb, jpegs[:n1], captions[:n1],
                                                   s.model_copy(update={"embed_batch_items": 1}), pids["embedder"])
        scratch = Path(tempfile.mkdtemp(prefix="mmsearch-bench-upsert-"))
        upsert_uri = suite.milvus_uri if milvus == "server" else str(scratch / "upsert-alone.db")
        t_ups = await alone("upsert", pids.get("milvus", me), stage_upsert(upsert_uri, vecs, model_id, captions, s))
        if milvus != "server":
            C.release_embedded_milvus(upsert_uri)
        shutil.rmtree(scratch, ignore_errors=True)
        stages = {"decode": t_dec, "caption": t_cap, "embed": t_emb, "upsert": t_ups}
        async with grpc.aio.insecure_channel(suite.search.address, options=C.CLIENT_OPTIONS) as channel:
            stub = search_pb2_grpc.SearchStub(channel)
            before = stage_seconds(suite.metrics_port)
            rate, counts, cpu_run = await e2e(stub, C.ingest_requests(jpegs), pids)
            after = stage_seconds(suite.metrics_port)
            rerun, rcounts, _ = await e2e(stub, C.ingest_requests(jpegs), pids)
            # Caller-supplied captions: no caption stage (different images, so nothing is unchanged).
            given = [caption_text(c) for c in captions]
            mid = stage_seconds(suite.metrics_port)
            rate_nc, ncounts, cpu_nc = await e2e(stub, C.ingest_requests(other, captions=given), pids)
            calls_nc = stage_seconds(suite.metrics_port)["embed_calls"] - mid["embed_calls"]
        ab_rows: list[list[Any]] = []
        if args.compare:
            # A/B of a search setting: rounds of (default, compare) in alternating order (ABBA...),
            # each run on a fresh disjoint image set, the search process restarted per switch.
            label = " ".join(f"{k}={v}" for k, v in args.compare.items())
            base_env = {k: suite.search_env.get(k, str(getattr(s, k.removeprefix("SEARCH_").lower())))
                        for k in args.compare}
            seed = 10
            for r in range(args.repeat):
                got: dict[str, tuple[float, float, float, float]] = {}
                for which in (("A", "B") if r % 2 == 0 else ("B", "A")):
                    await suite.restart_search(base_env if which == "A" else args.compare)
                    pids["search"] = suite.search.pid
                    seed += 1
                    imgs = C.sample_jpegs(args.images, max_side=args.max_side, seed=seed)
                    async with grpc.aio.insecure_channel(suite.search.address, options=C.CLIENT_OPTIONS) as channel:
                        c0 = stage_seconds(suite.metrics_port)["embed_calls"]
                        res = await e2e(search_pb2_grpc.SearchStub(channel), C.ingest_requests(imgs), pids)
                        n_calls = stage_seconds(suite.metrics_port)["embed_calls"] - c0
                    got[which] = (res[0], len(imgs) / max(n_calls, 1), sum(res[2][k] for k in pids) / len(imgs),
                                  res[2]["search"] / len(imgs) * 1000)
                ab_rows.append([milvus, r + 1, *got["A"], *got["B"], got["A"][0] / got["B"][0],
                                got["A"][3] / got["B"][3]])
            ab_rows.append([milvus, "median", *[float(np.median([row[i] for row in ab_rows])) for i in range(2, 12)]])
            ab_title = f"A/B: A = {' '.join(f'{k}={v}' for k, v in base_env.items())} (current), B = {label}"
        slowest = min(stages, key=lambda k: stages[k])
        no_overlap = 1 / sum(1 / v for v in stages.values())
        slow_nc = min(("decode", "embed", "upsert"), key=lambda k: stages[k])
        no_overlap_nc = 1 / sum(1 / stages[k] for k in ("decode", "embed", "upsert"))
        for k, v in stages.items():
            rows.append([milvus, f"stage alone: {k}", v, f"{cpu[k]:.3f} CPU s/item"])
            if k == "embed":
                rows.append([milvus, f"stage alone: embed, 1 image per call ({n1} items)", t_emb1,
                             (f"{cpu_emb1:.3f} CPU s/item ({cpu_emb1 / cpu['embed']:.1f}x the CPU of"
                              f" {s.embed_batch_items} per call)")])
        cpu_item = sum(cpu.values())
        e2e_cpu_item = sum(cpu_run[k] for k in pids) / len(jpegs)
        calls = after["embed_calls"] - before["embed_calls"]
        rows += [
            [milvus, "no overlap at all: 1/sum(1/stage)", no_overlap, f"{cpu_item:.3f} CPU s/item (sum)"],
            [milvus, f"CPU bound: {os.cpu_count()} cores / sum(CPU s/item)", (os.cpu_count() or 1) / cpu_item, ""],
            [milvus, f"end to end Ingest ({counts['stored']} stored)", rate,
             (f"{rate / stages[slowest]:.2f}x slowest ({slowest}); {rate / no_overlap:.2f}x no-overlap;"
              f" {e2e_cpu_item:.3f} CPU s/item; {len(jpegs) / max(calls, 1):.1f} items per Embed call")],
            [milvus, f"re-run, all unchanged ({rcounts['unchanged']})", rerun, f"{rerun / rate:.1f}x first run"],
            [milvus, f"end to end, caller captions ({ncounts['stored']} stored)", rate_nc,
             (f"{rate_nc / stages[slow_nc]:.2f}x slowest without caption ({slow_nc});"
              f" {rate_nc / no_overlap_nc:.2f}x no-overlap; {len(jpegs) / max(calls_nc, 1):.1f} items per Embed call")],
        ]
        wall = cpu_run["wall"]
        for k in ("decode", "check", "caption", "embed", "upsert"):
            busy = after.get(k, 0.0) - before.get(k, 0.0)
            where.append([milvus, k, busy, busy / wall])
        for k in ("search", "captioner", "embedder", "milvus"):
            if k in cpu_run:
                cpu_rows.append([milvus, k, cpu_run[k], cpu_run[k] / wall, cpu_nc.get(k, 0.0) / cpu_nc["wall"]])
        cpu_rows.append([milvus, "all", sum(cpu_run[k] for k in pids), sum(cpu_run[k] for k in pids) / wall,
                         sum(cpu_nc[k] for k in pids) / cpu_nc["wall"]])
        print(f"[{milvus}] e2e {rate:.2f} items/s vs slowest stage {slowest} {stages[slowest]:.2f}", flush=True)
    if remote is not None:
        remote.close()
    if args.compare:
        C.print_table(f"{ab_title}, {args.images} images per run (items/s, items per Embed call, CPU s/item of all"
                      " processes, CPU ms/item of the search process)",
                      ["milvus", "round", "A items/s", "A items/call", "A CPU s/item", "A search CPU ms/item",
                       "B items/s", "B items/call", "B CPU s/item", "B search CPU ms/item", "A / B items/s",
                       "A / B search CPU"], ab_rows)
    return rows, where, cpu_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--milvus", default="embedded", help="comma list of embedded, server")
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--max-side", type=int, default=512, help="downscale the sample photos (0 = full size)")
    parser.add_argument("--embedder-env", action="append", default=[], metavar="K=V",
                        help="extra EMBEDDER_* setting, e.g. EMBEDDER_TORCH_THREADS=1")
    parser.add_argument("--captioner-env", action="append", default=[], metavar="K=V")
    parser.add_argument("--search-env", action="append", default=[], metavar="K=V",
                        help="extra SEARCH_* setting for the search process")
    parser.add_argument("--compare", action="append", default=[], metavar="K=V",
                        help="A/B: also run end to end with the search process restarted with this SEARCH_* setting,"
                             " alternating with the current one, e.g. SEARCH_EMBED_BATCH_MAX_WAIT_MS=0"
                             " (the batching before the fix)")
    parser.add_argument("--repeat", type=int, default=2, help="A/B rounds (order alternates: AB, BA, ...)")
    parser.add_argument("--remote-captioner-ms", type=float, default=0,
                        help="caption with a simulated remote vision LLM (OpenAI-compatible, answers after this"
                             " many ms, no CPU) instead of the local lite model: the production shape")
    parser.add_argument("--single-items", type=int, default=24, help="items for the 1-image-per-call embed stage")
    parser.add_argument("--quick", action="store_true", help="48 images")
    args = parser.parse_args()
    args.embedder_env = dict(kv.split("=", 1) for kv in args.embedder_env)
    args.captioner_env = dict(kv.split("=", 1) for kv in args.captioner_env)
    args.search_env = dict(kv.split("=", 1) for kv in args.search_env)
    args.compare = dict(kv.split("=", 1) for kv in args.compare)
    if args.quick:
        args.images, args.single_items = 48, 8
    C.header("Ingest pipelining")
    rows, where, cpu = [], [], []
    for milvus in [m for m in args.milvus.split(",") if m]:
        r, w, c = asyncio.run(run(milvus, args))
        rows, where, cpu = rows + r, where + w, cpu + c
    C.print_table(f"Ingest rate, {args.images} images (items/s)", ["milvus", "measurement", "items/s", "ratio"], rows)
    C.print_table("Where the end-to-end time goes: busy seconds per stage (sum of call latencies)",
                  ["milvus", "stage", "busy s", "busy / wall"], where)
    C.print_table("CPU seconds per process during the end-to-end run", [
        "milvus", "process", "CPU s", "cores busy (with captioner)", "cores busy (caller captions)"], cpu)
    print("\nbusy / wall > 1 means the stage had several calls in flight at once.")
    jpegs = C.sample_jpegs(args.images, max_side=args.max_side)
    C.print_table(f"Search's own image check, {len(jpegs)} images, one thread (CPU ms per item, median of 3 "
                  "alternating rounds)", ["check", "CPU ms/item", "ratio to the decode"],
                  decode_variants(jpegs, SearchSettings()))


if __name__ == "__main__":
    main()
