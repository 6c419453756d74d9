"""Embedder benchmark: the served model against the same model called in-process.

Prints one table per modality with ratios measured in the same run:

  * service throughput vs the in-process model at equal batch (goal >= 0.9x);
  * 32 concurrent batch-1 clients vs serial batch-1 and vs the best in-process batch
    (goal >= 0.85x of best raw, >= 2x serial) - this is what dynamic batching buys;
  * gRPC hop overhead p50 for a short text: Embed p50 minus the in-process p50 of the
    same text (goal <= 1 ms), next to a no-op RPC (Info) p50 as the floor of the hop.

The server runs as a separate process (`python -m services.embedder`), as deployed; the
clients and the in-process baseline run in this process (never at the same time).
"In-process" is the same code path the server runs per item - decode + preprocess +
forward - called directly, serially.

    python bench/embedder_bench.py                 # lite backend, ~3 min on 2 vCPU
    python bench/embedder_bench.py --quick         # ~1 min
    python bench/embedder_bench.py --backend clip --model-dir DIR --device cuda
    python bench/embedder_bench.py --backend clip --random-clip b32 --device cuda --modalities image
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc

from bench.common import (
    closed_loop,
    cpu_seconds,
    free_port,
    sample_jpegs,
    scrape_metrics,
    start_process,
)
from mmsearch.common.v1 import types_pb2
from mmsearch.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from mmsearch.suite import ManagedProcess, ProcessSpec, service_spec


def sample_texts(n: int = 64) -> list[str]:
    subjects = [
        "a cat",
        "a tabby cat on a sofa",
        "a cup of espresso",
        "a rocket on the launch pad",
        "a red motorcycle",
        "a pink flower",
        "a chinese temple among trees",
        "a photographer with a tripod",
        "a wall clock",
        "an old brick wall",
        "the surface of the moon",
        "galaxies in deep space",
    ]
    return [f"{subjects[i % len(subjects)]}, photo {i}" for i in range(n)]


# --- measurement -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Rate:
    """Items per wall-clock second, and per CPU-second of the process doing the work.

    On a shared machine the wall-clock rate moves with the neighbours' load; the CPU rate
    (items per second of CPU the embedding process itself burnt) is much steadier and
    shows overheads (serialisation, scheduling, idle spinning) directly.
    """

    per_s: float
    per_cpu_s: float
    mean_batch: float | None = None  # mean model batch the service formed (served runs)


# --- in-process baseline -------------------------------------------------------------------


class Raw:
    """The backend called directly: decode + preprocess + forward, serially."""

    def __init__(self, settings: Any) -> None:
        from services.embedder.backends import create_backend

        self.settings = settings
        self.backend = create_backend(settings)
        started = time.perf_counter()
        self.backend.load()
        self.load_s = time.perf_counter() - started

    def run(self, modality: str, payloads: list[Any]) -> None:
        from services.common.images import decode_image
        from services.embedder.backends.base import Modality

        if modality == "text":
            batch = [self.backend.preprocess_text(t) for t in payloads]
            self.backend.forward(Modality.TEXT, batch)
        else:
            batch = [self.backend.preprocess_image(decode_image(b, self.settings.images), b) for b in payloads]
            self.backend.forward(Modality.IMAGE, batch)


def throughput(fn: Callable[[list[Any]], None], pool: list[Any], batch: int, seconds: float) -> Rate:
    """Rate of fn over batches cut round-robin from pool (after one warm-up call)."""

    def cut(i: int) -> list[Any]:
        return [pool[(i * batch + j) % len(pool)] for j in range(batch)]

    fn(cut(0))
    done, i, started, cpu = 0, 1, time.perf_counter(), time.process_time()
    while True:
        fn(cut(i))
        done += batch
        i += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds and i >= 2:
            return Rate(done / elapsed, done / max(time.process_time() - cpu, 1e-9))


# --- service ---------------------------------------------------------------------------------


def content(modality: str, payload: Any) -> types_pb2.Content:
    if modality == "text":
        return types_pb2.Content(text=payload)
    return types_pb2.Content(image=types_pb2.Image(data=payload))


@dataclass(frozen=True)
class Service:
    proc: ManagedProcess
    metrics_port: int

    def batches(self, modality: str) -> tuple[float, float]:
        """(items, batches) the model has run for a modality so far (embedder_batch_size)."""
        m = scrape_metrics(self.metrics_port)
        labels = (("modality", modality),)
        return m.get(("embedder_batch_size_sum", labels), 0.0), m.get(("embedder_batch_size_count", labels), 0.0)


def start_service(env: dict[str, str]) -> Service:
    metrics_port = free_port()
    spec = service_spec("embedder", free_port(), {**env, "EMBEDDER_LOG_LEVEL": "WARNING"}, metrics_port=metrics_port)
    return Service(start_process(spec, Path(tempfile.mkdtemp())), metrics_port)


async def service_throughput(
    service: Service, modality: str, pool: list[Any], batch: int, clients: int, seconds: float
) -> Rate:
    async with grpc.aio.insecure_channel(
        service.proc.address, options=[("grpc.max_receive_message_length", 64 << 20)]
    ) as channel:
        stub = embedder_pb2_grpc.EmbedderStub(channel)
        requests = [
            embedder_pb2.EmbedRequest(
                items=[content(modality, pool[(i * batch + j) % len(pool)]) for j in range(batch)]
            )
            for i in range(max(1, len(pool)))
        ]
        await asyncio.gather(*(stub.Embed(requests[c % len(requests)], timeout=120) for c in range(clients)))  # warm-up
        done = 0

        async def call(i: int) -> None:
            nonlocal done
            await stub.Embed(requests[i % len(requests)], timeout=120)
            done += batch

        items0, batches0 = service.batches(modality)
        started, cpu = time.perf_counter(), cpu_seconds(service.proc.pid)
        await closed_loop(call, clients, started + seconds)
        elapsed, cpu = time.perf_counter() - started, cpu_seconds(service.proc.pid) - cpu
        items1, batches1 = service.batches(modality)
        mean = (items1 - items0) / (batches1 - batches0) if batches1 > batches0 else None
        return Rate(done / elapsed, done / max(cpu, 1e-9), mean)


@dataclass(frozen=True)
class Latency:
    raw_ms: float  # in-process p50
    embed_ms: float  # served p50
    hop_ms: float  # served p50 - in-process p50
    noop_ms: float  # p50 of a no-op RPC (Info): the floor of any gRPC hop
    engine_ms: float  # in-process EmbeddingEngine.embed p50 - in-process p50 (batcher + model thread)
    floor_ms: float = 0.0  # bare grpc.aio call that waits raw_ms server-side: p50 - raw_ms


async def bare_wait_hop(wait_ms: float, n: int) -> float:
    """p50 overhead of a bare grpc.aio server (bench/wait_server.py, its own process) whose
    handler waits `wait_ms`: the hop floor for a call as long as the model's forward."""
    port = free_port()
    proc = start_process(ProcessSpec("wait-server", [sys.executable, str(Path(__file__).with_name("wait_server.py")),
                                                     str(port)], f"127.0.0.1:{port}", ready="tcp"),
                         Path(tempfile.mkdtemp()))
    try:
        async with grpc.aio.insecure_channel(proc.address) as channel:
            call = channel.unary_unary("/bench.Wait/Wait")
            request = f"{wait_ms:.3f}".encode()
            await proc.wait_ready_async(120)
            await call(request, timeout=10)  # warm-up
            times = []
            for _ in range(n):
                t = time.perf_counter()
                await call(request, timeout=10)
                times.append(time.perf_counter() - t)
        return statistics.median(times) * 1000 - wait_ms
    finally:
        proc.stop()


async def latency(service: Service, raw: Raw, n: int, text: str, block: int = 20) -> Latency:
    """Short-text latency: blocks of `block` in-process calls, in-process engine calls (the
    service's batcher and model thread, no gRPC), served calls and no-op RPCs, repeated, so
    slow drifts of the machine's load hit all four alike."""
    from services.common.content import TextContent
    from services.embedder.engine import EmbeddingEngine

    engine = EmbeddingEngine(raw.settings, raw.backend)  # the loaded backend: load() is idempotent
    await engine.start()
    async with grpc.aio.insecure_channel(service.proc.address) as channel:
        stub = embedder_pb2_grpc.EmbedderStub(channel)
        request = embedder_pb2.EmbedRequest(items=[types_pb2.Content(text=text)])
        info_request = embedder_pb2.InfoRequest()
        await stub.Embed(request, timeout=10)
        await stub.Info(info_request, timeout=10)
        raw_t: list[float] = []
        engine_t: list[float] = []
        svc_t: list[float] = []
        noop_t: list[float] = []
        for _ in range(max(1, n // block)):
            for _ in range(block):
                t = time.perf_counter()
                raw.run("text", [text])
                raw_t.append(time.perf_counter() - t)
            for _ in range(block):
                t = time.perf_counter()
                await engine.embed([TextContent(text)])
                engine_t.append(time.perf_counter() - t)
            for _ in range(block):
                t = time.perf_counter()
                await stub.Embed(request, timeout=10)
                svc_t.append(time.perf_counter() - t)
            for _ in range(block):
                t = time.perf_counter()
                await stub.Info(info_request, timeout=10)
                noop_t.append(time.perf_counter() - t)

    await engine.stop()

    def med(xs: list[float]) -> float:
        return statistics.median(xs) * 1000

    return Latency(med(raw_t), med(svc_t), med(svc_t) - med(raw_t), med(noop_t), med(engine_t) - med(raw_t))


# --- main ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="lite", choices=["lite", "clip", "bge"])
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--random-clip", choices=["tiny", "b32"], help="build a random CLIP checkpoint to benchmark")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--modalities", default="text,image")
    parser.add_argument("--batch", type=int, default=32, help="batch for 'equal batch' and max_model_batch_size")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=4.0, help="per throughput measurement")
    parser.add_argument("--torch-threads", type=int, help="torch intra-op threads, in-process and served alike")
    parser.add_argument("--latency-n", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="shorter measurements (~1 min on 2 vCPU)")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.latency_n = 2.0, 60
    raw_batches = sorted({1, 8, args.batch, 2 * args.batch} if not args.quick else {1, args.batch})

    model_dir = args.model_dir
    if args.random_clip:
        sys.path.insert(0, str(ROOT))
        from tests.embedder.tiny_clip import build_clip_b32_sized, build_tiny_clip

        model_dir = Path(tempfile.mkdtemp()) / f"random-clip-{args.random_clip}"
        (build_clip_b32_sized if args.random_clip == "b32" else build_tiny_clip)(model_dir)
    env = {
        "EMBEDDER_BACKEND": args.backend,
        "EMBEDDER_DEVICE": args.device,
        "EMBEDDER_DTYPE": args.dtype,
        "EMBEDDER_MAX_MODEL_BATCH_SIZE": str(args.batch),
        "EMBEDDER_MAX_BATCH_ITEMS": str(max(64, args.batch)),
        "EMBEDDER_MAX_QUEUE_ITEMS": str(max(1024, 2 * max(64, args.batch))),
    }
    if model_dir:
        env["EMBEDDER_MODEL_DIR"] = str(model_dir)
    if args.torch_threads:
        env["EMBEDDER_TORCH_THREADS"] = str(args.torch_threads)

    from services.embedder.settings import EmbedderSettings

    settings = EmbedderSettings(**{k.removeprefix("EMBEDDER_").lower(): v for k, v in env.items()})
    modalities = [m for m in args.modalities.split(",") if m]
    pools = {"text": sample_texts(), "image": sample_jpegs() if "image" in modalities else []}
    short_text = "a cat"

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()},"
        f" load average at start {os.getloadavg()[0]:.1f}"
    )
    started_all = time.perf_counter()
    service = start_service(env)  # loads in its own process while the baseline loads here
    try:
        raw = Raw(settings)
        print(
            f"backend {args.backend}: {raw.backend.info.model_id} dim {raw.backend.info.dimension}"
            f" (in-process load {raw.load_s:.1f} s)"
        )
        asyncio.run(service.proc.wait_ready_async(600))
        raw_results: dict[str, dict[int, Rate]] = {}
        svc: dict[str, dict[str, Rate]] = {}
        # Per modality, the in-process and the served measurements run back to back (the
        # server idles while the baseline runs), so both see the same machine load.
        for m in modalities:
            raw_results[m] = {
                b: throughput(lambda items, m=m: raw.run(m, items), pools[m], b, args.seconds) for b in raw_batches
            }
            svc[m] = {
                "equal": asyncio.run(service_throughput(service, m, pools[m], args.batch, 1, args.seconds)),
                "serial1": asyncio.run(service_throughput(service, m, pools[m], 1, 1, args.seconds)),
                "conc1": asyncio.run(service_throughput(service, m, pools[m], 1, args.clients, args.seconds)),
            }
        lat = asyncio.run(latency(service, raw, args.latency_n, short_text))
        lat = dataclasses.replace(lat, floor_ms=asyncio.run(bare_wait_hop(lat.raw_ms, args.latency_n)))
    finally:
        service.proc.stop()

    header = ("modality", "measurement", "items/s", "items/CPU-s", "mean model batch", "ratio (wall clock)",
              "ratio (CPU)")
    rows: list[tuple[str, ...]] = []

    def batch_of(rate: Rate) -> str:
        return "" if rate.mean_batch is None else f"{rate.mean_batch:.1f}"

    def ratio(a: Rate, b: Rate, what: str) -> tuple[str, str]:
        return f"{a.per_s / b.per_s:.2f}x {what}", f"{a.per_cpu_s / b.per_cpu_s:.2f}x"

    for m in modalities:
        r, s = raw_results[m], svc[m]
        best = max(r, key=lambda b: r[b].per_s)
        eq = r.get(args.batch) or r[max(r)]
        for b in sorted(r):
            label = f"in-process, batch {b}" + (" (serial)" if b == 1 else "")
            rows.append((m, label, f"{r[b].per_s:.1f}", f"{r[b].per_cpu_s:.1f}", str(b), "", ""))
        rows.append(
            (
                m,
                f"service, 1 client x batch {args.batch}",
                f"{s['equal'].per_s:.1f}",
                f"{s['equal'].per_cpu_s:.1f}",
                batch_of(s["equal"]),
                *ratio(s["equal"], eq, f"in-process batch {args.batch} (goal >= 0.9)"),
            )
        )
        rows.append(
            (
                m,
                "service, 1 client x batch 1 (serial)",
                f"{s['serial1'].per_s:.1f}",
                f"{s['serial1'].per_cpu_s:.1f}",
                batch_of(s["serial1"]),
                *ratio(s["serial1"], r[1], "in-process batch 1"),
            )
        )
        conc = s["conc1"]
        rows.append(
            (
                m,
                f"service, {args.clients} clients x batch 1",
                f"{conc.per_s:.1f}",
                f"{conc.per_cpu_s:.1f}",
                batch_of(conc),
                *ratio(conc, r[best], f"best in-process (batch {best}; goal >= 0.85)"),
            )
        )
        rows.append((m, "", "", "", "", *ratio(conc, s["serial1"], "served serial (goal >= 2)")))
    width = [max(len(row[i]) for row in [*rows, header]) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, width, strict=True)) + " |"

    print()
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in width) + "|")
    for row in rows:
        print(line(row))
    print()
    print(
        f"short text {short_text!r}, p50 of {args.latency_n}: in-process {lat.raw_ms:.2f} ms, gRPC Embed"
        f" {lat.embed_ms:.2f} ms -> hop overhead {lat.hop_ms:.2f} ms (goal <= 1 ms);"
        f" no-op gRPC Info {lat.noop_ms:.2f} ms"
    )
    rest = lat.hop_ms - lat.floor_ms - lat.engine_ms
    print(
        f"hop split: a bare grpc.aio call that waits {lat.raw_ms:.1f} ms server-side costs {lat.floor_ms:.2f} ms"
        f" more (the floor for any call this long; a no-op one: {lat.noop_ms:.2f} ms) + engine in-process (batcher,"
        f" model-thread hand-off) {lat.engine_ms:.2f} ms + the rest (interceptors, protobuf <-> numpy, noise)"
        f" {rest:.2f} ms"
    )
    print(
        f"total bench time {time.perf_counter() - started_all:.0f} s, load average at end {os.getloadavg()[0]:.1f}"
        " (other processes on the machine skew every number; compare ratios from one run)"
    )


if __name__ == "__main__":
    main()
