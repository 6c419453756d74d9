"""Model change: the admin backfill's rate against a plain Ingest of the same items, in the
same run (issue 18).

Each round starts the search process on a fresh index, ingests N sample photos (inline
bytes, caller captions: no captioning, so both sides do the same model work: one image and
one caption embedded per item, one Milvus write), then creates a candidate collection for
a second lite embedder (the same models through a fixed 384 -> 384 rotation: another model
id) and times `Admin.Backfill` of exactly those N items (images re-read from the original
store). Rounds interleave ingest and backfill measurements; the table gives each round and
the medians, items/s and CPU seconds per item of the search and embedder processes.

    python bench/reindex.py                 # 3 rounds of 120 images, ~4 min on 2 vCPU
    python bench/reindex.py --quick         # 2 rounds of 48
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common as C
from mmsearch.admin.v1 import admin_pb2, admin_pb2_grpc
from mmsearch.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from mmsearch.search.v1 import search_pb2_grpc
from mmsearch.suite import free_port, service_spec


async def _model_of(address: str) -> str:
    async with grpc.aio.insecure_channel(address) as channel:
        return (await embedder_pb2_grpc.EmbedderStub(channel).Info(embedder_pb2.InfoRequest(), timeout=60)).model_id


def _cpu(pids: dict[str, int]) -> dict[str, float]:
    return {k: C.cpu_seconds(p) for k, p in pids.items()}


async def run(args: argparse.Namespace) -> list[list[Any]]:
    workdir = Path(tempfile.mkdtemp(prefix="mmsearch-bench-reindex-"))
    quiet = {"EMBEDDER_LOG_LEVEL": "WARNING", "EMBEDDER_TORCH_THREADS": str(args.torch_threads)}
    other = C.start_process(service_spec("embedder", free_port(), {**quiet, "EMBEDDER_LITE__DIM": "384"},
                                         name="embedder-b"), workdir)
    await other.wait_ready_async(300)
    model_b = await _model_of(other.address)
    suite = C.Suite(with_captioner=False, embedder_env=quiet, search_env={
        "SEARCH_MODEL_EMBEDDERS": f"{model_b}={other.address}", "SEARCH_INDEX_TYPE": "FLAT",
        "SEARCH_ORIGINALS__DIR": str(workdir / "originals"), "SEARCH_COLLECTION": "bench_r0",
        "SEARCH_LOG_LEVEL": "INFO"})  # the copy logs its busy seconds per stage
    rows: list[list[Any]] = []
    try:
        await suite.start()
        for r in range(args.rounds):
            if r:
                await suite.restart_search({"SEARCH_COLLECTION": f"bench_r{r}"})
            pids = {"search": suite.procs["search"].pid, "embedder": suite.procs["embedder"].pid,
                    "embedder-b": other.pid}
            jpegs = C.sample_jpegs(args.images, max_side=args.max_side, seed=100 + r)
            captions = [f"sample photo {r}-{i}" for i in range(len(jpegs))]
            async with grpc.aio.insecure_channel(suite.procs["search"].address, options=C.CLIENT_OPTIONS) as channel:
                c0, t0 = _cpu(pids), time.perf_counter()
                counts = await C.ingest_all(search_pb2_grpc.SearchStub(channel),
                                            C.ingest_requests(jpegs, captions=captions))
                ingest_s, c1 = time.perf_counter() - t0, _cpu(pids)
                assert counts.get("stored") == len(jpegs), counts
                admin = admin_pb2_grpc.AdminStub(channel)
                await admin.CreateCandidate(admin_pb2.CreateCandidateRequest(embedder_model_id=model_b), timeout=120)
                t1 = time.perf_counter()
                last = None
                async for reply in admin.Backfill(admin_pb2.BackfillRequest(), timeout=3600):
                    last = reply.progress
                backfill_s, c2 = time.perf_counter() - t1, _cpu(pids)
                assert last is not None and last.copied == len(jpegs) and last.failed == 0, last
            n = len(jpegs)
            ingest_cpu = (c1["search"] - c0["search"] + c1["embedder"] - c0["embedder"]) / n
            backfill_cpu = (c2["search"] - c1["search"] + c2["embedder-b"] - c1["embedder-b"]) / n
            rows.append([r + 1, n / ingest_s, ingest_cpu, n / backfill_s, backfill_cpu,
                         (n / backfill_s) / (n / ingest_s)])
            print(f"round {r + 1}: ingest {n / ingest_s:.1f} items/s, backfill {n / backfill_s:.1f} items/s", flush=True)
    finally:
        suite.stop()
        other.stop()
    rows.append(["median", *[float(np.median([row[i] for row in rows])) for i in range(1, 6)]])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-side", type=int, default=512)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 48 images")
    args = parser.parse_args()
    if args.quick:
        args.images, args.rounds = 48, min(args.rounds, 2)
    C.header("Model change: backfill against plain ingest")
    rows = asyncio.run(run(args))
    C.print_table(f"{args.images} items per round, no captioning (items/s; CPU s/item of search + the embedder used)",
                  ["round", "ingest items/s", "ingest CPU s/item", "backfill items/s", "backfill CPU s/item",
                   "backfill / ingest"], rows)


if __name__ == "__main__":
    main()
