"""EMBEDDER_LITE__RUNTIME: the lite backend on ONNX Runtime / OpenVINO through the real gRPC
service answers with the torch path's vectors (cosine >= 0.9999) and the same model id."""

from __future__ import annotations

import importlib.util

import numpy as np

from mmsearch.embedder.v1 import embedder_pb2
from services.embedder.backends.lite import LiteBackend
from services.embedder.settings import LiteSettings
from services.lite_models.sample_photos import SAMPLE_QUERIES, load_sample_photos
from tests.embedder.conftest import composed, encode, image, make_settings, serve, text


def test_the_default_runtime_is_a_cpu_runtime() -> None:
    assert LiteSettings().runtime == "onnx"
    assert LiteBackend().runtime == LiteSettings().runtime
    assert make_settings(backend="lite", lite={"runtime": "openvino"}).lite.runtime == "openvino"


async def embed(backend: LiteBackend, settings, items: list) -> tuple[str, np.ndarray]:
    async with serve(settings, backend) as served:
        info = await served.stub.Info(embedder_pb2.InfoRequest())
        reply = await served.embed(*items, timeout=120)
    return info.model_id, np.array([e.values for e in reply.embeddings], dtype=np.float32)


async def test_cpu_runtimes_over_grpc_match_torch() -> None:
    jpegs = [encode(p.image) for p in load_sample_photos()[:4]]
    texts = [q.text for q in SAMPLE_QUERIES[:4]]
    items = [*[image(b) for b in jpegs], *[text(t) for t in texts], composed(jpegs[0], "in the snow", 0.5)]
    settings = make_settings(backend="lite", lite={"runtime": "torch"})
    want_id, want = await embed(LiteBackend.from_settings(settings), settings, items)
    for runtime in ("onnx", "openvino"):
        if importlib.util.find_spec("onnxruntime" if runtime == "onnx" else "openvino") is None:
            continue  # openvino is optional (not in the server extra)
        settings = make_settings(backend="lite", lite={"runtime": runtime})
        backend = LiteBackend.from_settings(settings)
        model_id, got = await embed(backend, settings, items)
        assert backend.conse.classifier.runtime == runtime and backend.conse.text_encoder.runtime == runtime
        assert model_id == want_id  # same space, same id: switching runtimes needs no re-index
        cosines = (got * want).sum(1)
        assert cosines.min() >= 0.9999, (runtime, cosines)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
