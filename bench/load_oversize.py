"""Memory under oversize input: RSS of one service process while a client keeps sending
images that are refused (just over the image byte limit, or any size you choose).

Every call is refused (INVALID_ARGUMENT), so nothing is kept by our code; what the table
shows is how much heap the process holds on to for receiving such messages (see
docs/operations.md, "Guarantees and how they are tested").

    python bench/load_oversize.py                           # embedder, 21 MiB images, 25 rounds of 8
    python bench/load_oversize.py --mib 3 --rounds 10
    python bench/load_oversize.py --env MALLOC_ARENA_MAX=2
"""
from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import grpc

from bench import common as C
from mmsearch.common.v1 import types_pb2
from mmsearch.embedder.v1 import embedder_pb2
from mmsearch.suite import service_spec


async def main_async(args: argparse.Namespace) -> None:
    C.header(f"Embedder RSS under refused {args.mib} MiB images")
    import tempfile

    workdir = Path(tempfile.mkdtemp(prefix="mmsearch-oversize-"))
    env = {"EMBEDDER_LOG_LEVEL": "WARNING", **dict(e.split("=", 1) for e in args.env)}
    proc = C.start_process(service_spec("embedder", C.free_port(), env), workdir)
    try:
        await proc.wait_ready_async(300)
        raw = embedder_pb2.EmbedRequest(items=[types_pb2.Content(image=types_pb2.Image(
            data=b"\x89PNG" + bytes(int(args.mib * 2**20))))]).SerializeToString()
        samples = [C.rss_mb(proc.pid)]
        codes: dict[str, int] = {}
        async with grpc.aio.insecure_channel(proc.address, options=[("grpc.max_send_message_length", -1)]) as ch:
            call = ch.unary_unary("/mmsearch.embedder.v1.Embedder/Embed", request_serializer=lambda b: b,
                                  response_deserializer=lambda b: b)
            for _ in range(args.rounds):
                for _ in range(args.per_round):
                    try:
                        await call(raw, timeout=60)
                        codes["OK"] = codes.get("OK", 0) + 1
                    except grpc.aio.AioRpcError as e:
                        codes[e.code().name] = codes.get(e.code().name, 0) + 1
                samples.append(C.rss_mb(proc.pid))
    finally:
        proc.stop()
    C.print_table("RSS (MiB) after each round", ["round", "calls so far", "RSS"],
                  [[i, i * args.per_round, s] for i, s in enumerate(samples)], digits=0)
    print(f"\ncodes: {codes}; start {samples[0]:.0f} MiB, max {max(samples):.0f} MiB, end {samples[-1]:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=float, default=21.0, help="size of each refused image")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--per-round", type=int, default=8)
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the embedder process")
    parser.add_argument("--quick", action="store_true", help="5 rounds")
    args = parser.parse_args()
    if args.quick:
        args.rounds = 5
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
