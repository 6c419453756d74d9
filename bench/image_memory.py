"""Peak memory under near-limit images: RSS of each service while 16 callers at once send
a 36 Mpx PNG of ~100 KB (under the 40 Mpx default limit: every call is valid).

Each round starts the suite twice, alternating: once as shipped (decodes shrink to what
the model needs, a process-wide pixel budget bounds concurrent large decodes, freed
buffers go back to the OS) and once as the baseline with all three off
(`IMAGES__REDUCE_ON_DECODE=false`, `IMAGES__MAX_DECODING_PIXELS=0`,
`RETURN_FREED_MEMORY=false`, and `SEARCH_DECODE_ON_INGEST=true`: full-size decodes, as before). Phases, one after the
other: 16 concurrent Embed calls to the embedder, 16 concurrent Caption calls to the
captioner, 16 concurrent one-item Ingest calls to search (which also embed). A sampler
thread reads every process' RSS every 5 ms; the table shows the peak over idle.

    python bench/image_memory.py                   # 2 rounds, ~3 min on 2 vCPU
    python bench/image_memory.py --rounds 1 --only reduced --clients 4 --side 3000   # CI smoke
"""
from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Self

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import grpc
from PIL import Image

from bench import common as C
from mmsearch.captioner.v1 import captioner_pb2, captioner_pb2_grpc
from mmsearch.common.v1 import types_pb2
from mmsearch.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from mmsearch.search.v1 import search_pb2_grpc

VARIANTS = {
    "reduced": {},
    # DECODE_ON_INGEST: search decoded every ingested image before issue 13 (only search reads it).
    "full": {"IMAGES__REDUCE_ON_DECODE": "false", "IMAGES__MAX_DECODING_PIXELS": "0", "RETURN_FREED_MEMORY": "false",
             "DECODE_ON_INGEST": "true"},
}
PHASES = ("embedder", "captioner", "search")


def near_limit_pngs(n: int, side: int) -> list[bytes]:
    """Distinct solid-colour PNGs (distinct content hashes, so no cache or dedup skips work)."""
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (side, side), (i * 13 % 256, 255 - i * 7 % 256, 90)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


class PeakSampler:
    """RSS of several processes every few ms, on a thread (the event loop is busy)."""

    def __init__(self, pids: dict[str, int], every_s: float = 0.005) -> None:
        self.pids, self.every_s = pids, every_s
        self.peak = {name: 0.0 for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], C.rss_mb(pid))
            time.sleep(self.every_s)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def phase(suite: C.Suite, name: str, images: list[bytes]) -> tuple[float, float, int]:
    """(idle RSS, peak RSS, failed calls) of process `name` while its calls run."""
    proc = suite.procs[name]
    idle = C.rss_mb(proc.pid)
    failures = 0
    async with grpc.aio.insecure_channel(proc.address, options=C.CLIENT_OPTIONS) as channel:
        if name == "embedder":
            stub: Any = embedder_pb2_grpc.EmbedderStub(channel)
            calls = [stub.Embed(embedder_pb2.EmbedRequest(items=[types_pb2.Content(image=types_pb2.Image(data=d))]),
                                timeout=300) for d in images]
        elif name == "captioner":
            stub = captioner_pb2_grpc.CaptionerStub(channel)
            calls = [stub.Caption(captioner_pb2.CaptionRequest(image=types_pb2.Image(data=d)), timeout=300)
                     for d in images]
        else:
            stub = search_pb2_grpc.SearchStub(channel)
            calls = [C.ingest_all(stub, C.ingest_requests([d], captions=["near-limit"]), 300) for d in images]
        with PeakSampler({name: proc.pid}) as sampler:
            results = await asyncio.gather(*calls, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException) or (isinstance(r, dict) and r.get("failed")):
            failures += 1
            if failures == 1:
                print(f"  {name}: a call failed: {r!r}"[:300])
    return idle, sampler.peak[name], failures


async def run_variant(variant: str, images: list[bytes]) -> dict[str, tuple[float, float, int]]:
    env = VARIANTS[variant]
    suite = C.Suite(embedder_env={f"EMBEDDER_{k}": v for k, v in env.items()},
                    captioner_env={f"CAPTIONER_{k}": v for k, v in env.items()},
                    search_env={f"SEARCH_{k}": v for k, v in env.items()})
    async with suite:
        return {name: await phase(suite, name, images) for name in PHASES}


async def main_async(args: argparse.Namespace) -> None:
    C.header(f"Peak RSS under {args.clients} concurrent {args.side}x{args.side} PNGs")
    variants = [args.only] if args.only else list(VARIANTS)
    results: dict[str, dict[str, list[tuple[float, float, int]]]] = {v: {p: [] for p in PHASES} for v in variants}
    for r in range(args.rounds):
        for variant in variants if r % 2 == 0 else variants[::-1]:  # alternate the order
            images = near_limit_pngs(args.clients, args.side)
            for name, value in (await run_variant(variant, images)).items():
                results[variant][name].append(value)
    rows = []
    for name in PHASES:
        row: list[Any] = [name]
        for variant in variants:
            samples = results[variant][name]
            row += [statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples),
                    statistics.median(s[1] - s[0] for s in samples), sum(s[2] for s in samples)]
        if len(variants) == 2:
            row.append(row[3] / row[7] if row[7] else float("nan"))
        rows.append(row)
    headers = ["service"]
    for v in variants:
        headers += [f"{v} idle MiB", f"{v} peak MiB", f"{v} peak-idle", f"{v} failed"]
    if len(variants) == 2:
        headers.append("peak-idle ratio reduced/full")
    C.print_table(f"RSS, median of {args.rounds} round(s)", headers, rows, digits=0 if len(variants) == 1 else 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--side", type=int, default=6000, help="PNG side in px (6000: 36 Mpx)")
    parser.add_argument("--only", choices=list(VARIANTS))
    parser.add_argument("--quick", action="store_true", help="1 round")
    args = parser.parse_args()
    if args.quick:
        args.rounds = 1
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
