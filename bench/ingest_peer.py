"""Ingest: the local suite (models process + search, lite models, Milvus Lite) against a
single-process batched peer doing the same work and storing the same rows (issue 17).

The peer (this file run with --peer) reads each image, decodes it once, runs one
EfficientNet-Lite0 forward per image shared by the caption (the lite captioner's labels,
description and keywords) and the ConSE image vector, embeds the caption texts with MiniLM
in batches, and upserts batches of `StoredRow`s with `MilvusStore.upsert` (search's schema,
ids, fingerprints) into its own Milvus Lite file. Both sides ingest the same images each
round, alternating which goes first; medians over rounds. Also: cold start (process start
to ready), idle RSS after load, and a check that the stored rows match (same ids and
captions, image vectors cos >= 0.999).

    python bench/ingest_peer.py                  # 200 images x 3 rounds
    python bench/ingest_peer.py --images 48 --rounds 1
    python bench/ingest_peer.py --peer-runtime torch   # the stretch goal: against a torch peer
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BATCH = 16  # images per peer step (4 per CNN forward, as the lite embedder on CPU)


# --- the peer ---------------------------------------------------------------------------------


def peer_main(db: str) -> None:
    import torch

    from services.captioner.backends.lite import LiteBackend as LiteCaptioner
    from services.captioner.parsing import clean_keywords, limit_words
    from services.captioner.settings import CaptionerSettings
    from services.common.images import decode_image
    from services.embedder.backends.base import Modality
    from services.embedder.backends.lite import LiteBackend
    from services.embedder.settings import EmbedderSettings
    from services.lite_models.imagenet import preprocess_image
    from services.search.domain import CaptionResult
    from services.search.ingest import caption_text, fingerprint_of
    from services.search.milvus_store import MilvusStore
    from services.search.ports import StoredRow
    from services.search.settings import SearchSettings

    emb, cap = EmbedderSettings(), CaptionerSettings()
    backend = LiteBackend.from_settings(emb)
    backend.load()
    classifier = backend.conse.classifier
    captioner = LiteCaptioner(cap, classifier)
    model_id = backend.info.model_id
    settings = SearchSettings(milvus_uri=db)
    loop = asyncio.new_event_loop()
    store = MilvusStore(settings)
    loop.run_until_complete(store.ensure_collection(model_id, backend.info.dimension))
    warm = np.zeros((2, 224, 224, 3), dtype=np.float32)
    classifier.forward_proba(torch.from_numpy(warm).permute(0, 3, 1, 2))
    backend.forward(Modality.TEXT, ["warm-up"])
    print("READY", classifier.runtime, flush=True)  # the runtime its forwards run on
    for line in sys.stdin:
        folder = Path(line.strip())
        started = time.perf_counter()
        files = sorted(folder.glob("*.jpg"))
        rows = 0
        for i in range(0, len(files), BATCH):
            datas = [f.read_bytes() for f in files[i : i + BATCH]]
            decoded = [decode_image(d, emb.images, backend.pixel_need) for d in datas]
            pixels = np.stack([preprocess_image(d.image) for d in decoded])
            probs = classifier.forward_proba(torch.from_numpy(pixels).permute(0, 3, 1, 2))
            image_vecs = backend._out(backend.conse.image_vectors_from_proba(probs))
            captions = []
            for row in probs:  # the lite captioner's own code, then service.py's limits
                c = captioner.caption_from_probs(classifier, row)
                captions.append(CaptionResult(limit_words(c.description, cap.default_max_words),
                                              clean_keywords(c.keywords, cap.max_keywords), classifier.model_id))
            text_vecs = backend.forward(Modality.TEXT, [caption_text(c) for c in captions])
            now_ms = int(time.time() * 1000)
            batch_rows = [
                StoredRow(id=d.sha256, content_sha256=d.sha256, fingerprint=fingerprint_of(d.sha256, {}, "", None, model_id),
                          uri="", caption=c.description, keywords=c.keywords, metadata={}, embedder_model_id=model_id,
                          captioner_model_id=c.model_id, ingested_at_ms=now_ms, image_vector=iv, caption_vector=tv)
                for d, c, iv, tv in zip(decoded, captions, image_vecs, text_vecs, strict=True)]
            loop.run_until_complete(store.upsert(batch_rows))
            rows += len(batch_rows)
        print("DONE", rows, time.perf_counter() - started, flush=True)


# --- the benchmark ----------------------------------------------------------------------------


def rows_of(db: str) -> dict[str, dict[str, Any]]:
    from pymilvus import MilvusClient

    client = MilvusClient(uri=db)
    out: dict[str, dict[str, Any]] = {}
    for name in client.list_collections():
        client.load_collection(name)
        for r in client.query(name, filter='id != ""', output_fields=["id", "caption", "keywords", "image_vector"],
                              limit=16384):
            out[r["id"]] = r
    client.close()
    return out


async def main() -> None:
    import grpc

    from bench import common as C
    from mmsearch.search.v1 import search_pb2_grpc
    from mmsearch.suite.launcher import LocalSuite, SuiteConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--peer-runtime", default="", choices=["", "torch", "onnx", "openvino"],
                    help="the peer's EMBEDDER_LITE__RUNTIME (default: its default, the suite's)")
    ap.add_argument("--peer", help=argparse.SUPPRESS)
    args = ap.parse_args()
    C.header("Ingest against a single-process peer (issue 17)")
    work = Path(tempfile.mkdtemp(prefix="mmsearch-peer-"))
    t0 = time.perf_counter()
    peer_env = {**os.environ, **({"EMBEDDER_LITE__RUNTIME": args.peer_runtime} if args.peer_runtime else {})}
    peer = subprocess.Popen([sys.executable, __file__, "--peer", str(work / "peer.db")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1], env=peer_env)
    assert peer.stdout is not None and peer.stdin is not None
    ready = peer.stdout.readline().split()
    assert ready[0] == "READY", ready
    peer_start = time.perf_counter() - t0
    time.sleep(2)
    peer_rss = C.rss_mb(peer.pid)

    t0 = time.perf_counter()
    suite = LocalSuite(SuiteConfig(data_dir=work / "suite", ports="auto", metrics=False), on_line=lambda *_: None)
    suite.start()
    suite_start = time.perf_counter() - t0
    time.sleep(2)
    pids = [p.pid for p in suite.processes if p.pid]
    names = {p.name: p.pid for p in suite.processes if p.pid}
    per_process: dict[str, list[float]] = {}
    suite_rss = sum(C.rss_mb(p) for p in pids)
    from services.embedder.settings import EmbedderSettings

    print(f"processes: suite {[p.name for p in suite.processes]}, peer 1; lite runtime: suite "
          f"{EmbedderSettings().lite.runtime} (its default), peer {ready[1]}")

    def cpu(ps: list[int]) -> float:
        return sum(C.cpu_seconds(p) for p in ps)

    results: dict[str, list[tuple[float, float]]] = {"suite": [], "peer": []}
    channel = grpc.aio.insecure_channel(suite.search_address, options=C.CLIENT_OPTIONS)
    stub = search_pb2_grpc.SearchStub(channel)
    for r in range(args.rounds):
        jpegs = C.sample_jpegs(args.images, seed=r + 1)
        folder = work / f"round{r}"
        folder.mkdir()
        for i, d in enumerate(jpegs):
            (folder / f"{i:05d}.jpg").write_bytes(d)
        order = ["suite", "peer"] if r % 2 == 0 else ["peer", "suite"]
        for side in order:
            if side == "suite":
                each0, s0 = {n: cpu([p]) for n, p in names.items()}, time.perf_counter()
                counts = await C.ingest_all(stub, C.ingest_requests(jpegs))
                took = time.perf_counter() - s0
                each = {n: cpu([p]) - each0[n] for n, p in names.items()}
                used = sum(each.values())
                for n, v in each.items():
                    per_process.setdefault(n, []).append(v / len(jpegs))
                assert counts["stored"] == len(jpegs), counts
            else:
                c0, s0 = cpu([peer.pid]), time.perf_counter()
                peer.stdin.write(f"{folder}\n")
                peer.stdin.flush()
                done = peer.stdout.readline().split()
                took, used = time.perf_counter() - s0, cpu([peer.pid]) - c0
                assert done[0] == "DONE" and int(done[1]) == len(jpegs), done
            results[side].append((len(jpegs) / took, used / len(jpegs)))
            print(f"round {r} {side}: {len(jpegs) / took:.1f} items/s, {1000 * used / len(jpegs):.1f} ms CPU/item",
                  flush=True)
    await channel.close()
    suite.stop()
    peer.stdin.close()
    peer.wait(60)

    # Same rows: ids, captions, keywords, image vectors.
    ours, theirs = rows_of(str(work / "suite" / "mmsearch.db")), rows_of(str(work / "peer.db"))
    same_ids = set(ours) == set(theirs)
    captions = sum(ours[i]["caption"] == theirs[i]["caption"] and list(ours[i]["keywords"]) == list(theirs[i]["keywords"])
                   for i in set(ours) & set(theirs))
    cos = [float(np.dot(np.asarray(ours[i]["image_vector"]), np.asarray(theirs[i]["image_vector"])))
           for i in set(ours) & set(theirs)]
    print(f"rows: suite {len(ours)}, peer {len(theirs)}, same ids {same_ids}, same caption+keywords {captions}, "
          f"image vector cos min {min(cos):.5f}")

    med = {k: (statistics.median(x for x, _ in v), statistics.median(y for _, y in v)) for k, v in results.items()}
    rows = [
        ("items/s (median)", med["suite"][0], med["peer"][0], med["suite"][0] / med["peer"][0], ">= 0.9"),
        ("CPU ms per item (median, all processes)", 1000 * med["suite"][1], 1000 * med["peer"][1],
         med["suite"][1] / med["peer"][1], "<= 1.15"),
        ("cold start s (start to ready)", suite_start, peer_start, suite_start / peer_start, "<= 1.2"),
        ("idle RSS MiB after load", suite_rss, peer_rss, suite_rss / peer_rss, "<= 1.3"),
    ]
    C.print_table(f"{args.images} images x {args.rounds} rounds, alternating", ["", "suite", "peer", "ratio", "goal"],
                  rows)
    print("suite CPU ms per item by process (median): "
          + ", ".join(f"{n} {1000 * statistics.median(v):.1f}" for n, v in per_process.items()))


if __name__ == "__main__":
    if "--peer" in sys.argv:
        peer_main(sys.argv[sys.argv.index("--peer") + 1])
    else:
        asyncio.run(main())
