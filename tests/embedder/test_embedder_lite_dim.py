"""EMBEDDER_LITE__DIM: a second lite configuration with another dimension and another model
id (the model-change tests' second embedder), through the real gRPC service on real photos.

Measured on the sample photos (21 queries x 17 photos) at DIM=128: the top-1 photo agrees
with the native 384-d model for 16 queries (all five asserted below), the mean Spearman
correlation of each query's similarities to the photos is 0.81, the largest change of a
cosine similarity 0.20. The bounds below leave room for BLAS rounding, not for a change.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from mmsearch.embedder.v1 import embedder_pb2
from services.embedder.backends.lite import PROJECTION_SEED, LiteBackend, projection
from services.embedder.settings import EmbedderSettings
from services.lite_models.sample_photos import SAMPLE_QUERIES, SamplePhoto, load_sample_photos
from tests.embedder.conftest import Served, composed, encode, image, make_settings, serve, text

ANCHORS = ("a cat", "a tabby cat", "a cup of coffee", "a rocket", "a motorcycle")


@pytest.fixture(scope="module")
def photos() -> list[SamplePhoto]:
    return load_sample_photos()


@pytest.fixture(scope="module")
def native() -> Iterator[LiteBackend]:
    yield LiteBackend(device="cpu")


@pytest.fixture(scope="module")
def projected() -> Iterator[LiteBackend]:
    yield LiteBackend.from_settings(make_settings(backend="lite", lite={"dim": 128}))


def vectors(reply: embedder_pb2.EmbedResponse) -> np.ndarray:
    return np.array([e.values for e in reply.embeddings], dtype=np.float32)


async def embed_all(served: Served, items: list) -> np.ndarray:
    out = []
    for start in range(0, len(items), 32):
        out.append(vectors(await served.embed(*items[start : start + 32], timeout=120)))
    return np.concatenate(out)


async def run(backend: LiteBackend, settings: EmbedderSettings, jpegs: list[bytes]) -> tuple:
    async with serve(settings, backend) as served:
        info = await served.stub.Info(embedder_pb2.InfoRequest())
        gallery = await embed_all(served, [image(b) for b in jpegs])
        queries = await embed_all(served, [text(q.text) for q in SAMPLE_QUERIES])
        mixed = vectors(await served.embed(composed(jpegs[0], "in the snow", 0.5)))
    return info, gallery, queries, mixed


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


async def test_lite_dim_128_is_another_model_with_the_same_ranking(
    native: LiteBackend, projected: LiteBackend, photos: list[SamplePhoto]
) -> None:
    names = [p.name for p in photos]
    jpegs = [encode(p.image) for p in photos]
    info0, gallery0, queries0, _ = await run(native, make_settings(backend="lite"), jpegs)
    settings = make_settings(backend="lite", lite={"dim": 128})
    info1, gallery1, queries1, mixed1 = await run(projected, settings, jpegs)

    # Info: another dimension, another id (the native one with a suffix).
    assert (info0.dimension, info1.dimension) == (384, 128)
    assert info1.backend == "lite"
    assert info1.model_id == f"{info0.model_id}-d128" != info0.model_id
    assert gallery1.shape == (len(photos), 128) and queries1.shape == (len(SAMPLE_QUERIES), 128)
    assert mixed1.shape == (1, 128)

    # Unit vectors: images, texts, composed items.
    for block in (gallery1, queries1, mixed1):
        np.testing.assert_allclose(np.linalg.norm(block, axis=1), 1.0, atol=1e-5)

    # Text -> image ranking roughly preserved.
    sims0, sims1 = queries0 @ gallery0.T, queries1 @ gallery1.T
    top0 = [names[i] for i in sims0.argmax(axis=1)]
    top1 = [names[i] for i in sims1.argmax(axis=1)]
    agree = {q.text: a == b for q, a, b in zip(SAMPLE_QUERIES, top0, top1, strict=True)}
    assert all(agree[q] for q in ANCHORS), (top0, top1)
    assert np.mean(list(agree.values())) >= 0.65, (top0, top1)
    rho = [spearman(a, b) for a, b in zip(sims0, sims1, strict=True)]
    assert np.mean(rho) >= 0.7, rho
    assert np.abs(sims0 - sims1).max() < 0.3  # Johnson-Lindenstrauss: cosines move a little
    # The projected image vectors are the native ones through the projection.
    expected = gallery0 @ projection(384, 128)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(gallery1, expected, atol=1e-4)


def test_projection_is_fixed_and_orthonormal() -> None:
    p = projection(384, 128)
    assert p.shape == (384, 128) and p.dtype == np.float32
    np.testing.assert_allclose(p.T @ p, np.eye(128), atol=1e-5)
    np.testing.assert_array_equal(p, projection(384, 128))  # deterministic
    # Pinned: if a numpy upgrade changed default_rng's stream, every projected vector (and so
    # every collection of a -d<dim> model) would move; this fails first.
    assert PROJECTION_SEED == 0x6D6D7365
    np.testing.assert_allclose(p[:2, :3], [[-0.0724514, 0.08086272, -0.01237448],
                                           [0.01387607, -0.04081612, -0.01479345]], atol=1e-5)
    assert abs(float(p.sum()) - -0.3112345) < 1e-3
    # Another dimension is another matrix; a larger one is an isometry.
    assert not np.allclose(projection(384, 64), p[:, :64])
    up = projection(384, 512)
    np.testing.assert_allclose(up @ up.T, np.eye(384), atol=1e-5)


def test_dim_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDDER_LITE__DIM", "128")
    settings = EmbedderSettings()
    assert settings.lite.dim == 128
    assert LiteBackend.from_settings(settings).dim == 128
    monkeypatch.delenv("EMBEDDER_LITE__DIM")
    assert EmbedderSettings().lite.dim is None
    with pytest.raises(ValueError):
        make_settings(lite={"dim": 0})
