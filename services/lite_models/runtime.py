"""CPU inference runtimes for the lite models: PyTorch, ONNX Runtime or OpenVINO.

The torch modules stay the source of truth: on first use with ``onnx`` or ``openvino`` the
model is exported from the same torch weights (``torch.onnx.export``, dynamic batch axis,
and dynamic sequence length for MiniLM) and the runtime's file is cached in the shared
cache dir, so later starts load it directly without touching the torch model:

- ``onnx``: the exported ONNX graph, run by ONNX Runtime's CPU execution provider;
- ``openvino``: the same graph converted to OpenVINO IR (xml + weights, fp32, no fp16
  compression), compiled for the CPU plugin with f32 inference precision (never the bf16
  default some CPUs would pick).

One cache file per (model, runtime): its name holds a hash of the weight files, this
module's export version, the runtime and the torch / runtime versions, so new weights or
a changed export never load a stale graph. Each file is written atomically (temp file +
rename), then a JSON manifest with their CRC32s (written last, checked at every load): a
file that is missing, truncated, altered or does not load is logged, exported again and
replaced. The runtimes open the files by path (ONNX Runtime keeps less memory that way,
OpenVINO memory-maps the weights).

Only the network runs in the runtime; tokenisation, pooling, normalisation and the
softmax stay in Python (imagenet.py, minilm.py), identical for every runtime.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import tempfile
import threading
import warnings
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, Protocol, get_args

import numpy as np

log = logging.getLogger(__name__)

RuntimeName = Literal["torch", "onnx", "openvino"]
RUNTIMES: tuple[str, ...] = get_args(RuntimeName)
#: Bump when the export changes (wrapper modules, opset, input/output names, container).
EXPORT_VERSION = 1
#: ONNX opset of the export (supported by every ONNX Runtime and OpenVINO we accept).
OPSET = 17

#: Counts exports done by this process (tests check that a cached file is reused).
export_count = 0
_export_lock = threading.Lock()


class ExportedModel(Protocol):
    """A loaded network: named numpy inputs -> its first output as a float32 array."""

    runtime: str
    path: Path

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray: ...


def check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown lite runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")
    return runtime


def file_digest(paths: Sequence[Path]) -> str:
    """SHA-256 over the contents of weight files (in order), names excluded."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def runtime_version(runtime: str) -> str:
    package = {"onnx": "onnxruntime", "openvino": "openvino"}.get(runtime)
    if package is None:
        raise ValueError(f"no exported file for runtime {runtime!r}")
    try:
        module = importlib.import_module(package)
    except ImportError as exc:
        raise RuntimeError(f"the {runtime} lite runtime needs the {package!r} package (pip install {package})") from exc
    return str(module.__version__)


def cache_path(cache_dir: Path, name: str, weights_digest: str, runtime: str) -> Path:
    """The manifest of the files cached for model ``name`` on ``runtime`` (they sit next to
    it: ``.onnx``, or OpenVINO's ``.xml`` + ``.bin``)."""
    import torch

    payload = json.dumps(
        {
            "model": name,
            "weights": weights_digest,
            "export_version": EXPORT_VERSION,
            "opset": OPSET,
            "runtime": runtime,
            "runtime_version": runtime_version(runtime),
            "torch": torch.__version__,
        },
        sort_keys=True,
    )
    key = hashlib.sha256(payload.encode()).hexdigest()[:24]
    return Path(cache_dir) / f"lite-{name}-{runtime}-{key}.json"


# ------------------------------------------------------------------------- export
def export_onnx(
    module: object,
    example_args: tuple[object, ...],
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: dict[str, dict[int, str]],
) -> bytes:
    """``torch.onnx.export`` (the TorchScript exporter: a few seconds on 2 cores, where the
    dynamo exporter takes ~25 s for EfficientNet-Lite0; opset 17) into memory."""
    import io

    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation/tracer notes
        torch.onnx.export(
            module,  # type: ignore[arg-type]
            example_args,
            buf,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    return buf.getvalue()


def _runtime_files(runtime: str, onnx_bytes: bytes) -> dict[str, bytes]:
    """The files cached for ``runtime`` (by suffix): the ONNX graph, or OpenVINO IR."""
    if runtime == "onnx":
        return {".onnx": onnx_bytes}
    import openvino as ov

    with tempfile.TemporaryDirectory(prefix="mmsearch-ov-") as tmp:
        onnx_path, xml = Path(tmp) / "model.onnx", Path(tmp) / "model.xml"
        onnx_path.write_bytes(onnx_bytes)
        model = ov.Core().read_model(onnx_path)
        ov.save_model(model, xml, compress_to_fp16=False)
        return {".xml": xml.read_bytes(), ".bin": xml.with_suffix(".bin").read_bytes()}


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_cache(manifest: Path, files: dict[str, bytes]) -> None:
    """Each file atomically (temp file + rename), then the manifest with their CRC32s: it
    is written last, so a reader that finds it finds every file complete."""
    try:
        manifest.parent.mkdir(parents=True, exist_ok=True)
        for suffix, data in files.items():
            _atomic_write(manifest.with_suffix(suffix), data)
        crcs = {suffix: zlib.crc32(data) for suffix, data in files.items()}
        _atomic_write(manifest, json.dumps({"export_version": EXPORT_VERSION, "crc32": crcs}).encode())
    except OSError as exc:  # read-only cache dir: still works, exports again next start
        log.warning("could not write lite model cache %s: %s", manifest, exc)


def _check_cache(manifest: Path) -> None:
    """Raise unless the manifest and every file it names are there with their CRC32."""
    crcs = json.loads(manifest.read_bytes())["crc32"]
    if not crcs:
        raise ValueError("empty manifest")
    for suffix, crc in crcs.items():
        with open(manifest.with_suffix(suffix), "rb") as f:
            value = 0
            while chunk := f.read(1 << 22):
                value = zlib.crc32(chunk, value)
        if value != crc:
            raise ValueError(f"{manifest.with_suffix(suffix).name} is truncated or altered")


# --------------------------------------------------------------------------- load
class _OrtModel:
    def __init__(self, manifest: Path, threads: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle pool threads sleep instead of spinning: the preprocess workers share the cores.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.runtime, self.path = "onnx", manifest.with_suffix(".onnx")
        # From the path, not from bytes: ORT keeps ~85 MiB less for MiniLM that way.
        self._session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self._session.get_inputs()]

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        # InferenceSession.run is thread-safe.
        return np.asarray(self._session.run(None, feeds)[0], dtype=np.float32)


class _OpenVinoModel:
    def __init__(self, manifest: Path, threads: int) -> None:
        import openvino as ov

        core = ov.Core()
        self.path = manifest.with_suffix(".xml")
        model = core.read_model(self.path)  # the .bin next to it is memory-mapped
        config = {
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            "INFERENCE_PRECISION_HINT": "f32",  # bf16 is the default on AMX/avx512_bf16 CPUs
            "ENABLE_CPU_PINNING": False,  # a shared box: do not pin threads to cores
        }
        self.runtime = "openvino"
        self._compiled = core.compile_model(model, "CPU", config)
        self.input_names = [i.get_any_name() for i in self._compiled.inputs]
        self._local = threading.local()  # an InferRequest is not thread-safe: one per thread

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        result = request.infer(feeds)
        return np.array(result[0], dtype=np.float32, copy=True)  # the request reuses its buffers


def _open(runtime: str, manifest: Path, threads: int) -> ExportedModel:
    if runtime == "onnx":
        return _OrtModel(manifest, threads)
    return _OpenVinoModel(manifest, threads)


def load_exported(
    runtime: str,
    *,
    name: str,
    weight_files: Sequence[Path],
    export: Callable[[], bytes],
    cache_dir: Path,
    threads: int,
) -> ExportedModel:
    """The model ``name`` on ``runtime``: from the cache file, else exported (``export()``
    returns the ONNX bytes, from the torch weights) and cached. A cache file that does not
    read or load is exported again and replaced."""
    check_runtime(runtime)
    if runtime == "torch":
        raise ValueError("the torch runtime runs the torch module directly")
    manifest = cache_path(Path(cache_dir), name, file_digest(weight_files), runtime)
    if manifest.is_file():
        try:
            _check_cache(manifest)
            return _open(runtime, manifest, threads)
        except Exception as exc:  # noqa: BLE001 - any failure means: rebuild it
            log.warning("rebuilding the unreadable lite model cache %s: %s", manifest, exc)
    global export_count
    with _export_lock:
        files = _runtime_files(runtime, export())
        export_count += 1
    _write_cache(manifest, files)
    if not manifest.is_file():  # could not write it: run from a private temporary copy
        tmp = Path(tempfile.mkdtemp(prefix="mmsearch-lite-"))
        manifest = tmp / manifest.name
        _write_cache(manifest, files)
    log.info("exported %s for %s to %s", name, runtime, manifest)
    return _open(runtime, manifest, threads)
