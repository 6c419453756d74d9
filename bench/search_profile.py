"""Profile the search service process under a search or ingest load with py-spy.

Starts the suite as processes (see common.Suite), drives a load from this process, and
samples the *search* process with `py-spy record` (all threads, GIL-holding samples
only by default, so idle waits do not hide the work). Writes a speedscope profile and
prints the top functions by own samples and by inclusive samples, restricted to frames
that hold the GIL: on this service the GIL is the scarce resource (the event loop, the
Milvus client threads and, in embedded mode, Milvus Lite itself share it).

    python bench/search_profile.py --load vector --seconds 20
    python bench/search_profile.py --load text --milvus server
    python bench/search_profile.py --load ingest --images 200
    python bench/search_profile.py --load vector --out /tmp/search.speedscope.json

Needs py-spy (`pip install py-spy`) and ptrace permission on the child processes.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import grpc

from bench import common as C
from mmsearch.common.v1 import types_pb2
from mmsearch.search.v1 import search_pb2, search_pb2_grpc


def py_spy() -> str:
    exe = Path(sys.executable).with_name("py-spy")
    return str(exe) if exe.exists() else (shutil.which("py-spy") or "py-spy")


_LINE = re.compile(r":\d+\)$")


def summarize(raw: Path, top: int) -> None:
    """Top functions from py-spy's collapsed-stack output (`--format raw`)."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        own[frames[-1]] += n
        # inclusive counts per function (line numbers dropped), once per stack
        for f in {_LINE.sub(")", f) for f in frames}:
            incl[f] += n
    if not total:
        print("no samples")
        return
    C.print_table(f"Own samples (top {top} of {total} samples)", ["%", "function (file:line)"],
                  [[100 * n / total, f] for f, n in own.most_common(top)], digits=1)
    C.print_table(f"Inclusive samples (top {top})", ["%", "function (file)"],
                  [[100 * n / total, f] for f, n in incl.most_common(top)], digits=1)
    ours = [(f, n) for f, n in incl.most_common() if "services/" in f][:top]
    C.print_table("Inclusive samples, services/ code only", ["%", "function (file)"],
                  [[100 * n / total, f] for f, n in ours], digits=1)


async def search_load(stub: Any, kind: str, stop_at: float, clients: int, dim: int) -> int:
    vec = C.unit_vectors(64, dim, seed=3)
    jpegs = C.sample_jpegs(max_side=512)
    done = 0

    def request(i: int) -> Any:
        if kind == "vector":
            return search_pb2.SearchRequest(query_vector=types_pb2.Embedding(values=vec[i % 64].tolist()), top_k=10)
        if kind == "image":
            return search_pb2.SearchRequest(query=types_pb2.Content(image=types_pb2.Image(data=jpegs[i % len(jpegs)])),
                                            top_k=10)
        if kind == "hybrid":
            return search_pb2.SearchRequest(query=types_pb2.Content(text=f"a cat {i % 50}"), top_k=10,
                                            target=search_pb2.TARGET_HYBRID)
        return search_pb2.SearchRequest(query=types_pb2.Content(text=f"a cat {i % 50}"), top_k=10)

    async def call(i: int) -> None:
        nonlocal done
        await stub.Search(request(i), timeout=30)
        done += 1

    await C.closed_loop(call, clients, stop_at)
    return done


async def main_async(args: argparse.Namespace) -> None:
    async with C.Suite(milvus=args.milvus) as suite, \
            grpc.aio.insecure_channel(suite.search.address, options=C.CLIENT_OPTIONS) as channel:
            stub = search_pb2_grpc.SearchStub(channel)
            jpegs = C.sample_jpegs(args.images, max_side=512)
            if args.load != "ingest":
                await C.ingest_all(stub, C.ingest_requests(jpegs[: min(len(jpegs), 48)]))
                dim = (await stub.Stats(search_pb2.StatsRequest(), timeout=30)).dimension
            raw = Path(tempfile.mkdtemp()) / "profile.txt"
            cmd = [py_spy(), "record", "--pid", str(suite.search.pid), "--duration", str(int(args.seconds)),
                   "--rate", str(args.rate), "--format", "raw", "--output", str(raw), "--threads"]
            if not args.idle:
                cmd.append("--gil")
            if args.native:
                cmd.append("--native")
            spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # noqa: ASYNC220
            await asyncio.sleep(1.0)
            started = time.perf_counter()
            if args.load == "ingest":
                counts = await C.ingest_all(stub, C.ingest_requests(jpegs))
                print(f"ingested {counts} in {time.perf_counter() - started:.1f} s")
            else:
                n = await search_load(stub, args.load, started + args.seconds - 1.5, args.clients, dim)
                print(f"{n} {args.load} searches in {time.perf_counter() - started:.1f} s ({args.clients} clients)")
            _, err = await asyncio.to_thread(spy.communicate)
            if spy.returncode:
                print(err.decode(errors="replace")[-2000:])
            summarize(raw, args.top)
            if args.out:
                shutil.copy(raw, args.out)
                print(f"collapsed stacks written to {args.out} (speedscope / inferno read them)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", default="vector", choices=["vector", "text", "image", "hybrid", "ingest"])
    parser.add_argument("--milvus", default="embedded", choices=["embedded", "server"])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--idle", action="store_true", help="also count samples not holding the GIL")
    parser.add_argument("--native", action="store_true", help="include native frames")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, help="keep the collapsed stacks here")
    args = parser.parse_args()
    C.header(f"py-spy profile of the search process, load={args.load}, milvus={args.milvus}")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
