"""The models process (`python -m services.models`) over gRPC on loopback: both contracts
on one port, both health names SERVING, reflection lists both services, and the caption
and the image vector of one image cost one classifier forward (its /metrics counter)."""
from __future__ import annotations

import io
import urllib.request
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from mmsearch.captioner.v1 import captioner_pb2, captioner_pb2_grpc
from mmsearch.common.v1 import types_pb2
from mmsearch.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from mmsearch.suite.process import ManagedProcess, free_port, service_spec

pytestmark = pytest.mark.slow

EMBEDDER = "mmsearch.embedder.v1.Embedder"
CAPTIONER = "mmsearch.captioner.v1.Captioner"


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize((320, 240), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


class Models:
    def __init__(self, address: str, metrics_port: int) -> None:
        self.channel = grpc.insecure_channel(address)
        self.embedder = embedder_pb2_grpc.EmbedderStub(self.channel)
        self.captioner = captioner_pb2_grpc.CaptionerStub(self.channel)
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"

    def forwards(self) -> float:
        text = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "models_classifier_images_total":
                    return sample.value
        raise AssertionError("models_classifier_images_total is not exported")

    def caption(self, data: bytes) -> captioner_pb2.Caption:
        reply = self.captioner.Caption(captioner_pb2.CaptionRequest(image=types_pb2.Image(data=data)), timeout=60)
        return reply.caption

    def embed(self, *data: bytes) -> np.ndarray:
        items = [types_pb2.Content(image=types_pb2.Image(data=d)) for d in data]
        reply = self.embedder.Embed(embedder_pb2.EmbedRequest(items=items), timeout=60)
        return np.array([e.values for e in reply.embeddings], dtype=np.float32)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Models]:
    port, metrics_port = free_port(), free_port()
    env = {"MODELS_LOG_JSON": "true", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = ManagedProcess(service_spec("models", port, env, metrics_port=metrics_port),
                          log_file=tmp_path_factory.mktemp("models") / "models.log")
    proc.start()
    try:
        proc.wait_ready(300)
        m = Models(f"127.0.0.1:{port}", metrics_port)
        yield m
        m.channel.close()
    finally:
        proc.stop(10)


def test_both_health_names_serve_and_reflection_lists_both(models: Models) -> None:
    health = health_pb2_grpc.HealthStub(models.channel)
    for name in ("", EMBEDDER, CAPTIONER):
        reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
    stub = reflection_pb2_grpc.ServerReflectionStub(models.channel)
    replies = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                             timeout=10))
    names = {s.name for s in replies[0].list_services_response.service}
    assert {EMBEDDER, CAPTIONER} <= names


def test_caption_then_embed_of_one_image_costs_one_forward(models: Models) -> None:
    data = jpeg(1)
    before = models.forwards()
    caption = models.caption(data)
    assert caption.description and caption.keywords and caption.model_id == "efficientnet-lite0-imagenet1k"
    assert models.forwards() == before + 1
    vector = models.embed(data)
    assert models.forwards() == before + 1, "the embedder reused the caption's class probabilities"
    assert vector.shape == (1, 384) and abs(float(np.linalg.norm(vector)) - 1.0) < 1e-3
    # The other order, and a batch: each new image costs one forward, reused by the other call.
    a, b = jpeg(2), jpeg(3)
    vectors = models.embed(a, b)
    assert models.forwards() == before + 3
    batch = models.captioner.CaptionBatch(captioner_pb2.CaptionBatchRequest(requests=[
        captioner_pb2.CaptionRequest(image=types_pb2.Image(data=d)) for d in (a, b)]), timeout=60)
    assert [r.WhichOneof("outcome") for r in batch.results] == ["caption", "caption"]
    assert models.forwards() == before + 3
    # The cached path gives what a fresh forward gives (another process would compute).
    assert np.allclose(models.embed(a, b), vectors, atol=1e-5)


def test_a_bad_image_fails_alone_as_in_the_separate_services(models: Models) -> None:
    with pytest.raises(grpc.RpcError) as e:
        models.caption(b"not an image")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as e:
        models.embed(b"not an image")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
