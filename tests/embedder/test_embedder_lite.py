"""The lite backend (real pretrained weights) through the real gRPC service, on real photos."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from PIL import ImageOps

from mmsearch.embedder.v1 import embedder_pb2
from services.embedder.backends.lite import LiteBackend
from services.lite_models.sample_photos import SAMPLE_QUERIES, SamplePhoto, load_sample_photos
from tests.embedder.conftest import Served, composed, encode, image, make_settings, metric, serve, text


@pytest.fixture(scope="module")
def lite_backend() -> Iterator[LiteBackend]:
    yield LiteBackend(device="cpu")


@pytest.fixture(scope="module")
def photos() -> list[SamplePhoto]:
    return load_sample_photos()


def vectors(reply: embedder_pb2.EmbedResponse) -> np.ndarray:
    return np.array([e.values for e in reply.embeddings], dtype=np.float32)


async def embed_all(served: Served, items: list) -> np.ndarray:
    out = []
    for start in range(0, len(items), 32):
        out.append(vectors(await served.embed(*items[start : start + 32], timeout=120)))
    return np.concatenate(out)


async def test_lite_on_real_photos(lite_backend: LiteBackend, photos: list[SamplePhoto]) -> None:
    settings = make_settings(backend="lite")
    names = [p.name for p in photos]
    jpegs = [encode(p.image) for p in photos]
    flipped = [encode(ImageOps.mirror(p.image)) for p in photos]
    images_before = metric("embedder_items_total", modality="image")
    async with serve(settings, lite_backend) as served:
        info = await served.stub.Info(embedder_pb2.InfoRequest())
        gallery = await embed_all(served, [image(b) for b in jpegs])
        queries = await embed_all(served, [text(q.text) for q in SAMPLE_QUERIES])
        copies = await embed_all(served, [image(b) for b in flipped])
        cat = jpegs[names.index("cat")]
        mixed = vectors(await served.embed(composed(cat, "in the snow", 0.5), image(cat), text("in the snow")))

    # Info tells the truth.
    assert (info.backend, info.dimension) == ("lite", 384)
    assert info.model_id == lite_backend.conse.model_id
    assert info.model_id.startswith("conse-efficientnet-lite0-imagenet1k+all-MiniLM-L6-v2-t10-")
    assert list(info.modalities) == [
        embedder_pb2.MODALITY_TEXT,
        embedder_pb2.MODALITY_IMAGE,
        embedder_pb2.MODALITY_COMPOSED,
    ]
    assert not info.composed_native
    assert (info.max_batch_items, info.max_model_batch_size, info.max_text_chars) == (64, 32, 2048)
    assert metric("embedder_items_total", modality="image") - images_before == 2 * len(photos) + 1

    # All vectors are unit length.
    for block in (gallery, queries, copies, mixed):
        np.testing.assert_allclose(np.linalg.norm(block, axis=1), 1.0, atol=1e-5)

    # Text -> image: the right photo ranks first.
    ranked = np.argsort(-(queries @ gallery.T), axis=1)
    top1 = [names[r[0]] for r in ranked]
    hits = {q.text: top == q.expected for q, top in zip(SAMPLE_QUERIES, top1, strict=True)}
    assert hits["a cat"] and hits["a tabby cat"] and hits["a cup of coffee"] and hits["a rocket"], top1
    assert hits["a motorcycle"], top1
    recall = np.mean(list(hits.values()))
    in_vocabulary = np.mean([hits[q.text] for q in SAMPLE_QUERIES if q.imagenet_concept])
    assert recall >= 0.70, (recall, top1)
    assert in_vocabulary >= 0.85, (in_vocabulary, top1)

    # Image -> image: each flipped copy's nearest neighbour is its original.
    nearest = np.argmax(copies @ gallery.T, axis=1)
    assert [names[i] for i in nearest] == names

    # Composed: unit length, and neither the image nor the instruction alone.
    c, v, t = mixed
    assert float(c @ v) < 0.999 and float(c @ t) < 0.999
    assert float(c @ v) > float(t @ v) and float(c @ t) > float(v @ t)  # between its two parts
