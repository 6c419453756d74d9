"""Lite embedder on three CPU runtimes: torch vs ONNX Runtime vs OpenVINO (issue 17).

In process, no gRPC: the lite embedder backend (services/embedder/backends/lite.py) is
loaded once per runtime and its model forwards are timed on the same preprocessed images
and the same texts, in alternating rounds (the order rotates each round) so shared-machine
noise hits every runtime alike; the tables give medians over the rounds:

  * images/s and CPU ms per image: ``forward(IMAGE)`` (EfficientNet-Lite0 + ConSE) in
    batches of the backend's CPU image batch limit; decoding and preprocessing are the same
    numpy/PIL code for every runtime and are left out;
  * texts/s and CPU ms per text: ``forward(TEXT)`` (tokenizer + MiniLM + pooling) in batches
    of EMBEDDER_MAX_MODEL_BATCH_SIZE (32);
  * agreement with torch: the smallest cosine of a vector with torch's vector;
  * load: ``LiteBackend.load()`` in a fresh process, cold (torch: the weights; onnx /
    openvino: the first start, export included) and cached (onnx / openvino: a later start
    that loads the exported file), and the process RSS after the load. The ConSE class
    vectors are pre-cached for every load (they are not what differs).

    python bench/lite_runtime.py                 # ~5 min on 2 vCPU
    python bench/lite_runtime.py --quick         # ~2-3 min
    python bench/lite_runtime.py --threads 2 --runtimes torch,onnx
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np

from bench.common import header, print_table, rss_mb, sample_jpegs

RUNTIMES = ("torch", "onnx", "openvino")


def sample_texts(n: int) -> list[str]:
    from services.lite_models.sample_photos import SAMPLE_QUERIES

    subjects = ["a tabby cat", "a cup of espresso", "a red motorcycle", "a rocket on the launch pad",
                "a golden retriever", "a bowl of ramen", "a snowy mountain", "an old lighthouse"]
    extras = ["", " on a sunny afternoon", " next to a window, photographed from above",
              " in a busy street market full of people, with neon signs and rain on the ground"]
    base = [q.text for q in SAMPLE_QUERIES]
    out = []
    for i in range(n):
        out.append(base[i % len(base)] if i % 3 == 0 else f"{subjects[i % len(subjects)]}{extras[i % len(extras)]}")
    return out


def backend(runtime: str, cache_dir: Path, threads: int) -> Any:
    from services.embedder.backends.lite import LiteBackend

    return LiteBackend(device="cpu", torch_threads=threads, cache_dir=cache_dir, runtime=runtime)


# --- load, in a child process -------------------------------------------------------------


def load_child(runtime: str, cache_dir: Path, threads: int) -> None:
    """Runs in a fresh process: one load, one JSON line (seconds, RSS before/after, exports)."""
    from services.lite_models import runtime as rt

    b = backend(runtime, cache_dir, threads)
    before = rss_mb(os.getpid())
    t0 = time.perf_counter()
    b.load()
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "rss_before": before, "rss": rss_mb(os.getpid()),
                      "exports": rt.export_count}))


def load_once(runtime: str, cache_dir: Path, threads: int) -> dict[str, float]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--load-child", runtime, "--cache-dir", str(cache_dir),
            "--threads", str(threads)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"load of {runtime} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def fresh_dir(base: Path, classvecs: list[Path]) -> Path:
    """An empty export cache that already holds the ConSE class vectors."""
    path = Path(tempfile.mkdtemp(prefix="cache-", dir=base))
    for f in classvecs:
        shutil.copy(f, path / f.name)
    return path


def measure_loads(runtimes: list[str], rounds: int, threads: int, work: Path, classvecs: list[Path]) -> dict:
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for r in range(rounds):
        order = runtimes[r % len(runtimes):] + runtimes[: r % len(runtimes)]
        for runtime in order:
            cache = fresh_dir(work, classvecs)
            first = load_once(runtime, cache, threads)
            results.setdefault((runtime, "cold"), []).append(first)
            if runtime != "torch":
                assert first["exports"] == 2, first  # both networks exported
                cached = load_once(runtime, cache, threads)
                assert cached["exports"] == 0, cached  # and reused on the next start
                results.setdefault((runtime, "cached"), []).append(cached)
            shutil.rmtree(cache, ignore_errors=True)
    return results


# --- throughput, in this process ----------------------------------------------------------


def timed(fn: Any, items: list, batch: int) -> tuple[float, float, np.ndarray]:
    """(wall s, CPU s of this process, outputs) for ``fn`` over ``items`` in batches."""
    out = []
    c0, t0 = time.process_time(), time.perf_counter()
    for start in range(0, len(items), batch):
        out.append(fn(items[start : start + batch]))
    return time.perf_counter() - t0, time.process_time() - c0, np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtimes", default=",".join(RUNTIMES))
    ap.add_argument("--threads", type=int, default=1, help="EMBEDDER_TORCH_THREADS (the runtimes' intra-op threads)")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--texts", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--load-rounds", type=int, default=2)
    ap.add_argument("--text-batch", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="16 images, 64 texts, 5 rounds, 1 load round")
    ap.add_argument("--load-child", help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load_child:
        load_child(args.load_child, args.cache_dir, args.threads)
        return
    if args.quick:
        args.images, args.texts, args.rounds, args.load_rounds = 16, 64, 5, 1
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    header("Lite embedder: CPU inference runtimes (in process)")
    print(f"threads {args.threads}; {args.images} images, {args.texts} texts, {args.rounds} rounds, "
          f"{args.load_rounds} load round(s)")

    import torch
    from PIL import Image

    from services.embedder.backends.base import Modality
    from services.embedder.backends.lite import CPU_IMAGE_BATCH_LIMIT
    from services.lite_models.imagenet import preprocess_image

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="mmsearch-lite-runtime-"))
    try:
        # The class vectors once (torch), then every backend starts from a copy of them.
        base = work / "base"
        loaded = {}
        b = backend("torch", base, args.threads)
        b.load()
        loaded["torch"] = b
        classvecs = sorted(base.glob("conse-classvecs-*.npy"))

        import io

        pixels = [preprocess_image(Image.open(io.BytesIO(j))) for j in sample_jpegs(args.images)]
        texts = sample_texts(args.texts)
        for runtime in runtimes:
            if runtime not in loaded:
                loaded[runtime] = backend(runtime, fresh_dir(work, classvecs), args.threads)
                loaded[runtime].load()
        for b in loaded.values():  # warm-up: lazy init, allocations, shape specialisation
            b.forward(Modality.IMAGE, pixels[:CPU_IMAGE_BATCH_LIMIT])
            b.forward(Modality.TEXT, texts[: args.text_batch])

        stats: dict[str, dict[str, list[float]]] = {r: {} for r in runtimes}
        outputs: dict[str, dict[str, np.ndarray]] = {r: {} for r in runtimes}
        for r in range(args.rounds):
            order = runtimes[r % len(runtimes):] + runtimes[: r % len(runtimes)]
            for runtime in order:
                b = loaded[runtime]
                for modality, items, batch in ((Modality.IMAGE, pixels, CPU_IMAGE_BATCH_LIMIT),
                                               (Modality.TEXT, texts, args.text_batch)):
                    wall, cpu, out = timed(lambda chunk, b=b, m=modality: b.forward(m, chunk), items, batch)
                    s = stats[runtime]
                    s.setdefault(f"{modality.value}/s", []).append(len(items) / wall)
                    s.setdefault(f"{modality.value} cpu ms", []).append(cpu * 1000 / len(items))
                    outputs[runtime][modality.value] = out
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

        loads = measure_loads(runtimes, args.load_rounds, args.threads, work, classvecs)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = lambda xs: statistics.median(xs) if xs else float("nan")
    ref = outputs.get("torch")
    rows = []
    for runtime in runtimes:
        s = stats[runtime]
        if ref is not None:
            agree = min(float(np.min((outputs[runtime][m] * ref[m]).sum(1))) for m in ("image", "text"))
        else:
            agree = float("nan")
        rows.append([runtime, med(s["image/s"]), med(s["image cpu ms"]), med(s["text/s"]), med(s["text cpu ms"]),
                     f"{agree:.7f}"])
    print_table(f"Throughput (median of {args.rounds} alternating rounds; images in batches of "
                f"{CPU_IMAGE_BATCH_LIMIT}, texts in batches of {args.text_batch})",
                ["runtime", "images/s", "CPU ms / image", "texts/s", "CPU ms / text", "min cosine vs torch"], rows, 1)
    rows = []
    for runtime in runtimes:
        cold = loads[(runtime, "cold")]
        cached = loads.get((runtime, "cached"), [])
        rows.append([runtime,
                     med([x["seconds"] for x in cold]),
                     med([x["seconds"] for x in cached]) if cached else "-",
                     med([x["rss"] for x in (cached or cold)]),
                     med([x["rss"] - x["rss_before"] for x in (cached or cold)])])
    print_table(f"Load in a fresh process (median of {args.load_rounds}; cold = torch weights, or first start "
                "with the export; cached = a later start)",
                ["runtime", "cold load s", "cached load s", "RSS after load MiB", "of which the load MiB"], rows, 1)


if __name__ == "__main__":
    main()
