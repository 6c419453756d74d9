"""The clip backend: a tiny random CLIP checkpoint in the real format, loaded by the production
loader and served over gRPC; its vectors must equal the model called directly (fp32, CPU)."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2
from PIL import Image

from mmsearch.embedder.v1 import embedder_pb2
from services.embedder.backends.bge import VisualizedBgeBackend, _visualized_bge_class
from services.embedder.backends.clip import ClipBackend
from tests.embedder.conftest import composed, encode, image, make_settings, serve, text


def photos() -> list[bytes]:
    rng = np.random.default_rng(7)
    out = []
    for i in range(5):
        arr = rng.integers(0, 255, (40 + 7 * i, 50 + 3 * i, 3), dtype=np.uint8)
        out.append(encode(Image.fromarray(arr), "PNG"))  # lossless: both paths see the same pixels
    return out


def direct_vectors(clip_dir: Path, texts: list[str], images: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """The reference: transformers' own classes, no embedder code."""
    import io

    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(clip_dir).eval()
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    processor = CLIPImageProcessor.from_pretrained(clip_dir)
    with torch.inference_mode():
        t = model.get_text_features(**tokenizer(texts, padding=True, return_tensors="pt"))
        pixels = processor(images=[Image.open(io.BytesIO(b)).convert("RGB") for b in images], return_tensors="pt")
        v = model.get_image_features(**pixels)
    t = t if isinstance(t, torch.Tensor) else t.pooler_output
    v = v if isinstance(v, torch.Tensor) else v.pooler_output
    norm = lambda x: torch.nn.functional.normalize(x.float(), dim=-1).numpy()
    return norm(t), norm(v)


async def test_service_vectors_equal_the_model_called_directly(clip_dir: Path, clip_backend: ClipBackend) -> None:
    texts = ["a photo of a cat", "the red car", "a dog"]
    images = photos()
    settings = make_settings(backend="clip", model_dir=clip_dir, dtype="float32", max_queue_delay_ms=1)
    async with serve(settings, clip_backend) as served:
        info = await served.stub.Info(embedder_pb2.InfoRequest())
        assert (info.backend, info.model_id, info.dimension) == ("clip", "clip:tiny-clip", 16)
        assert list(info.modalities) == [
            embedder_pb2.MODALITY_TEXT,
            embedder_pb2.MODALITY_IMAGE,
            embedder_pb2.MODALITY_COMPOSED,
        ]
        assert info.composed_native is False
        reply = await served.embed(*[text(t) for t in texts], *[image(b) for b in images])
    got = np.array([e.values for e in reply.embeddings], dtype=np.float32)
    want_t, want_v = direct_vectors(clip_dir, texts, images)
    cos = np.sum(got * np.concatenate([want_t, want_v]), axis=1)
    assert cos.min() >= 0.9999, cos


async def test_composed_mixes_image_and_instruction(clip_dir: Path, clip_backend: ClipBackend) -> None:
    settings = make_settings(backend="clip", model_dir=clip_dir, dtype="float32")
    data = photos()[0]
    async with serve(settings, clip_backend) as served:
        reply = await served.embed(composed(data, "the red car", 0.3), image(data), text("the red car"))
    c, v, t = (np.array(e.values) for e in reply.embeddings)
    assert abs(np.linalg.norm(c) - 1) < 1e-5
    expected = 0.7 * v + 0.3 * t
    np.testing.assert_allclose(c, expected / np.linalg.norm(expected), atol=1e-5)


async def test_concurrent_callers_share_batches_in_order(clip_dir: Path, clip_backend: ClipBackend) -> None:
    import asyncio

    settings = make_settings(backend="clip", model_dir=clip_dir, dtype="float32", max_queue_delay_ms=20)
    words = ["a", "the", "photo", "of", "cat", "dog", "red", "car"]
    async with serve(settings, clip_backend) as served:
        alone = {w: np.array((await served.embed(text(w))).embeddings[0].values) for w in words}
        replies = await asyncio.gather(*(served.embed(text(w)) for w in words * 4))
    for w, reply in zip(words * 4, replies, strict=True):
        np.testing.assert_allclose(np.array(reply.embeddings[0].values), alone[w], atol=1e-5)


async def test_a_directory_without_a_checkpoint_fails_start(tmp_path: Path) -> None:
    settings = make_settings(backend="clip", model_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        async with serve(settings, ClipBackend.from_settings(settings)):
            pass


async def test_bge_without_its_package_fails_start_with_a_clear_message(tmp_path: Path) -> None:
    # Visualized BGE's model code cannot run here (its torchvision needs CUDA torch): see
    # docs/embedder.md.
    try:
        _visualized_bge_class()
    except RuntimeError:
        pass
    else:  # pragma: no cover - only where the package exists
        pytest.skip("Visualized BGE is importable; this test covers its absence")
    weights = tmp_path / "Visualized_base_en_v1.5.pth"
    weights.write_bytes(b"")
    settings = make_settings(backend="bge", model_dir=tmp_path, bge={"weights_file": weights})
    with pytest.raises(RuntimeError, match=r"visual_bge.*FlagEmbedding\.visual"):
        async with serve(settings, VisualizedBgeBackend.from_settings(settings)):
            pass


def test_clip_needs_a_model_dir() -> None:
    with pytest.raises(ValueError, match="EMBEDDER_MODEL_DIR"):
        ClipBackend.from_settings(make_settings(backend="clip"))


async def test_persistent_cuda_oom_turns_health_not_serving(
    clip_dir: Path, clip_backend: ClipBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    settings = make_settings(backend="clip", model_dir=clip_dir, dtype="float32")
    async with serve(settings, clip_backend) as served:
        assert await served.health_status() == health_pb2.HealthCheckResponse.SERVING
        sizes: list[int] = []

        def out_of_memory(modality: object, batch: list[object]) -> np.ndarray:
            sizes.append(len(batch))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        monkeypatch.setattr(clip_backend, "forward", out_of_memory)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await served.embed(text("a"), text("the"), text("cat"), text("dog"))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "out of memory" in caught.value.details()
        assert sizes[0] == 4 and min(sizes) == 1  # retried in halves down to batch size 1
        await asyncio.sleep(1.3)  # readiness is polled every second
        assert await served.health_status() == health_pb2.HealthCheckResponse.NOT_SERVING
        monkeypatch.undo()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await served.embed(text("a cat"))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "not serving" in caught.value.details()
