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
a changed export never load a stale graph. The file is written atomically (temp file +
rename) and carries a CRC32 of its payload: a file that is truncated, altered or does not
load is logged, exported again and replaced.

Only the network runs in the runtime; tokenisation, pooling, normalisation and the
softmax stay in Python (imagenet.py, minilm.py), identical for every runtime.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
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
_MAGIC = b"MMSLRT1\n"
_HEADER = struct.Struct("<Q")

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
    if runtime == "onnx":
        import onnxruntime

        return str(onnxruntime.__version__)
    if runtime == "openvino":
        import openvino

        return str(openvino.__version__)
    raise ValueError(f"no exported file for runtime {runtime!r}")


def cache_path(cache_dir: Path, name: str, weights_digest: str, runtime: str) -> Path:
    """Where the exported file of model ``name`` for ``runtime`` is cached."""
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
    return Path(cache_dir) / f"lite-{name}-{runtime}-{key}.mmlrt"


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


def _runtime_parts(runtime: str, onnx_bytes: bytes) -> list[bytes]:
    """The bytes cached for ``runtime``: the ONNX graph, or OpenVINO IR (xml, weights)."""
    if runtime == "onnx":
        return [onnx_bytes]
    import openvino as ov

    with tempfile.TemporaryDirectory(prefix="mmsearch-ov-") as tmp:
        onnx_path, xml = Path(tmp) / "model.onnx", Path(tmp) / "model.xml"
        onnx_path.write_bytes(onnx_bytes)
        model = ov.Core().read_model(onnx_path)
        ov.save_model(model, xml, compress_to_fp16=False)
        return [xml.read_bytes(), xml.with_suffix(".bin").read_bytes()]


def _write_cache(path: Path, parts: list[bytes]) -> None:
    """Atomic write (temp file + rename): concurrent starts never read half a file."""
    header = json.dumps(
        {"lengths": [len(p) for p in parts], "crc32": [zlib.crc32(p) for p in parts]}
    ).encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(_MAGIC + _HEADER.pack(len(header)) + header)
                for part in parts:
                    f.write(part)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:  # read-only cache dir: still works, exports again next start
        log.warning("could not write lite model cache %s: %s", path, exc)


def _read_cache(path: Path) -> list[bytes]:
    data = path.read_bytes()
    if not data.startswith(_MAGIC):
        raise ValueError("not a lite runtime cache file")
    start = len(_MAGIC) + _HEADER.size
    (hlen,) = _HEADER.unpack_from(data, len(_MAGIC))
    header = json.loads(data[start : start + hlen])
    pos, parts = start + hlen, []
    for length, crc in zip(header["lengths"], header["crc32"], strict=True):
        part = data[pos : pos + length]
        if len(part) != length or zlib.crc32(part) != crc:
            raise ValueError("truncated or altered payload")
        parts.append(part)
        pos += length
    if pos != len(data):
        raise ValueError("trailing bytes")
    return parts


# --------------------------------------------------------------------------- load
class _OrtModel:
    def __init__(self, path: Path, parts: list[bytes], threads: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle pool threads sleep instead of spinning: the preprocess workers share the cores.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.runtime, self.path = "onnx", path
        self._session = ort.InferenceSession(parts[0], opts, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self._session.get_inputs()]

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        # InferenceSession.run is thread-safe.
        return np.asarray(self._session.run(None, feeds)[0], dtype=np.float32)


class _OpenVinoModel:
    def __init__(self, path: Path, parts: list[bytes], threads: int) -> None:
        import openvino as ov

        core = ov.Core()
        xml, weights = parts
        model = core.read_model(xml.decode("utf-8"), ov.Tensor(np.frombuffer(weights, dtype=np.uint8)))
        config = {
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            "INFERENCE_PRECISION_HINT": "f32",  # bf16 is the default on AMX/avx512_bf16 CPUs
            "ENABLE_CPU_PINNING": False,  # a shared box: do not pin threads to cores
        }
        self.runtime, self.path = "openvino", path
        self._compiled = core.compile_model(model, "CPU", config)
        self.input_names = [i.get_any_name() for i in self._compiled.inputs]
        self._local = threading.local()  # an InferRequest is not thread-safe: one per thread

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        result = request.infer(feeds)
        return np.array(result[0], dtype=np.float32, copy=True)  # the request reuses its buffers


def _open(runtime: str, path: Path, parts: list[bytes], threads: int) -> ExportedModel:
    if runtime == "onnx":
        return _OrtModel(path, parts, threads)
    return _OpenVinoModel(path, parts, threads)


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
    path = cache_path(Path(cache_dir), name, file_digest(weight_files), runtime)
    if path.is_file():
        try:
            return _open(runtime, path, _read_cache(path), threads)
        except Exception as exc:  # noqa: BLE001 - any failure means: rebuild it
            log.warning("rebuilding the unreadable lite model cache %s: %s", path, exc)
    global export_count
    with _export_lock:
        parts = _runtime_parts(runtime, export())
        export_count += 1
    _write_cache(path, parts)
    log.info("exported %s for %s to %s", name, runtime, path)
    return _open(runtime, path, parts, threads)
