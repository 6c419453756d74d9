"""Tests for services.lite_models: real weights, real photos, no network."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from services.lite_models.conse import ConSEEmbedder
from services.lite_models.efficientnet_lite import (
    build_efficientnet_lite0,
    efficientnet_lite0_weights_path,
    load_efficientnet_lite0,
)
from services.lite_models.imagenet import ImageNetClassifier, preprocess_images
from services.lite_models.minilm import MiniLMTextEncoder, minilm_model_dir
from services.lite_models.sample_photos import (
    SAMPLE_QUERIES,
    SamplePhoto,
    load_sample_photos,
    sample_photo_names,
)


# --------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def classifier() -> ImageNetClassifier:
    return ImageNetClassifier()


@pytest.fixture(scope="module")
def text_encoder() -> MiniLMTextEncoder:
    return MiniLMTextEncoder()


@pytest.fixture(scope="module")
def photos() -> list[SamplePhoto]:
    return load_sample_photos()


@pytest.fixture(scope="module")
def photo_probs(classifier: ImageNetClassifier, photos: list[SamplePhoto]) -> np.ndarray:
    return classifier.predict_proba([p.image for p in photos])


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mmsearch-cache")


@pytest.fixture(scope="module")
def conse(
    classifier: ImageNetClassifier, text_encoder: MiniLMTextEncoder, cache_dir: Path
) -> ConSEEmbedder:
    return ConSEEmbedder(classifier, text_encoder, cache_dir=cache_dir)


def _by_name(photos: list[SamplePhoto], probs: np.ndarray, name: str) -> np.ndarray:
    return probs[[p.name for p in photos].index(name)]


# ------------------------------------------------------------ efficientnet/imagenet
def test_efficientnet_weights_load_strictly() -> None:
    state = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    model = build_efficientnet_lite0()
    result = model.load_state_dict(state, strict=True)  # raises on any mismatch
    assert not result.missing_keys and not result.unexpected_keys
    assert "_conv_stem.weight" in state and "_fc.weight" in state
    assert state["_fc.weight"].shape == (1000, 1280)
    # Lite variant: no squeeze-excitation weights, ReLU6, BN eps 1e-3.
    assert not any("_se_" in k for k in state)
    assert isinstance(model._swish, torch.nn.ReLU6)
    assert model._bn0.eps == pytest.approx(1e-3)


def test_load_efficientnet_lite0_eval_channels_last() -> None:
    model = load_efficientnet_lite0()
    assert not model.training
    assert model._conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    assert not any(p.requires_grad for p in model.parameters())


def test_preprocess_shape_dtype_layout(photos: list[SamplePhoto]) -> None:
    gray = next(p.image for p in photos if p.image.mode == "L")
    rgba = Image.new("RGBA", (50, 300), (255, 0, 0, 128))
    x = preprocess_images([photos[0].image, gray, rgba])
    assert x.shape == (3, 3, 224, 224)
    assert x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert -1.0 <= float(x.min()) and float(x.max()) <= 128 / 128 + 1e-6
    # (x - 127) / 128 normalisation: pure red stays red.
    assert float(x[2, 0].mean()) == pytest.approx((255 - 127) / 128, abs=1e-5)
    assert float(x[2, 1].mean()) == pytest.approx((0 - 127) / 128, abs=1e-5)
    assert ImageNetClassifier.preprocess([]).shape == (0, 3, 224, 224)


def test_class_names(classifier: ImageNetClassifier) -> None:
    names = classifier.class_names
    assert len(names) == 1000 and all(isinstance(n, str) and n for n in names)
    assert names[281] == "tabby cat" and names[967] == "espresso"
    assert classifier.model_id == "efficientnet-lite0-imagenet1k"


def test_predict_proba_is_a_distribution(
    classifier: ImageNetClassifier, photos: list[SamplePhoto], photo_probs: np.ndarray
) -> None:
    assert photo_probs.shape == (len(photos), 1000) and photo_probs.dtype == np.float32
    np.testing.assert_allclose(photo_probs.sum(axis=1), 1.0, atol=1e-4)
    # forward_proba on a separately preprocessed batch gives the same result.
    tensor = classifier.preprocess([p.image for p in photos[:3]])
    np.testing.assert_allclose(classifier.forward_proba(tensor), photo_probs[:3], atol=1e-5)
    assert classifier.predict_proba([]).shape == (0, 1000)


@pytest.mark.parametrize(
    ("photo", "acceptable"),
    [
        ("cat", {"tabby cat", "a cat having a striped coat", "Egyptian Mau", "Persian cat"}),
        ("coffee", {"espresso", "tea cup", "coffee mug"}),
        ("rocket", {"missile", "space shuttle"}),
        ("motorcycle", {"moped", "motor scooter"}),
        ("flower", {"daisy"}),
    ],
)
def test_classifier_on_real_photos(
    classifier: ImageNetClassifier,
    photos: list[SamplePhoto],
    photo_probs: np.ndarray,
    photo: str,
    acceptable: set[str],
) -> None:
    # every acceptable name must be a real class name, or the assert is vacuous
    assert acceptable <= set(classifier.class_names)
    top3 = classifier.top_k(_by_name(photos, photo_probs, photo), k=3)
    print(f"{photo}: {top3}")
    assert len(top3) == 3
    assert [p for _, p in top3] == sorted((p for _, p in top3), reverse=True)
    assert {name for name, _ in top3} & acceptable, top3


def test_top_k_merges_duplicate_names(classifier: ImageNetClassifier) -> None:
    names = classifier.class_names
    dup = [i for i, n in enumerate(names) if n == "missile"]
    assert len(dup) == 2
    probs = np.zeros(1000, dtype=np.float32)
    probs[dup] = [0.3, 0.2]
    probs[0] = 0.4
    assert classifier.top_k(probs, 2) == [
        ("missile", pytest.approx(0.5)),
        (names[0], pytest.approx(0.4)),
    ]
    unmerged = classifier.top_k(probs, 2, merge_duplicates=False)
    assert [n for n, _ in unmerged] == [names[0], "missile"]


# ------------------------------------------------------------------------ MiniLM
def test_minilm_matches_sentence_transformers(text_encoder: MiniLMTextEncoder) -> None:
    from sentence_transformers import SentenceTransformer

    texts = [
        "a cat",
        "A cup of coffee on a wooden table.",
        "",
        "Ünïcödé and 東京 text",
        "long " * 400,  # exercises truncation at 256 tokens
    ] + [f"query number {i} " * (i % 7 + 1) for i in range(70)]  # > one batch
    ours = text_encoder.encode(texts)
    st = SentenceTransformer(str(minilm_model_dir()), device="cpu", local_files_only=True)
    assert st.max_seq_length == 256
    ref = st.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    assert ours.shape == (len(texts), 384) and ours.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    cos = (ours * ref).sum(axis=1)
    assert cos.min() >= 0.9999, cos.min()
    assert text_encoder.encode([]).shape == (0, 384)
    assert text_encoder.dim == 384 and text_encoder.model_id == "all-MiniLM-L6-v2"


# ------------------------------------------------------------------------- ConSE
def test_conse_class_vector_cache(
    conse: ConSEEmbedder,
    classifier: ImageNetClassifier,
    text_encoder: MiniLMTextEncoder,
    cache_dir: Path,
) -> None:
    assert conse.class_vectors.shape == (1000, 384)
    assert conse.cache_path.parent == cache_dir and conse.cache_path.is_file()
    t0 = time.perf_counter()
    again = ConSEEmbedder(classifier, text_encoder, cache_dir=cache_dir)
    assert time.perf_counter() - t0 < 1.0  # loaded, not recomputed
    np.testing.assert_array_equal(again.class_vectors, conse.class_vectors)
    assert again.model_id == conse.model_id
    # A different template must not reuse the cached file.
    other = ConSEEmbedder(
        classifier, text_encoder, prompt_template="a photo of a {}", cache_dir=cache_dir
    )
    assert other.cache_path != conse.cache_path and other.model_id != conse.model_id
    assert len(list(cache_dir.glob("*.npy"))) == 2


def test_conse_vectors_and_compose(conse: ConSEEmbedder, photo_probs: np.ndarray) -> None:
    img = conse.image_vectors_from_proba(photo_probs)
    assert img.shape == (len(photo_probs), 384) and img.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=1e-5)
    # scaling the probabilities (e.g. renormalising the top-T) does not change vectors
    np.testing.assert_allclose(conse.image_vectors_from_proba(photo_probs * 3.0), img, atol=1e-5)
    txt = conse.embed_texts(["a cat", "a rocket"])
    mixed = ConSEEmbedder.compose(img[:2], txt, text_weight=0.5)
    np.testing.assert_allclose(np.linalg.norm(mixed, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(ConSEEmbedder.compose(img[:2], txt, 0.0), img[:2], atol=1e-6)
    np.testing.assert_allclose(ConSEEmbedder.compose(img[:2], txt, 1.0), txt, atol=1e-6)
    with pytest.raises(ValueError):
        ConSEEmbedder.compose(img[:2], txt, 1.5)


def test_sample_photos_catalogue(photos: list[SamplePhoto]) -> None:
    names = [p.name for p in photos]
    assert names == sample_photo_names() and len(set(names)) == len(names) >= 15
    assert all(q.expected in names for q in SAMPLE_QUERIES)
    assert all(p.image.mode in ("RGB", "L") and min(p.image.size) >= 200 for p in photos)


def _recall_at_1(sims: np.ndarray, expected: np.ndarray) -> np.ndarray:
    return sims.argmax(axis=1) == expected


def test_conse_text_to_image_retrieval(
    conse: ConSEEmbedder, photos: list[SamplePhoto], photo_probs: np.ndarray
) -> None:
    names = [p.name for p in photos]
    gallery = conse.image_vectors_from_proba(photo_probs)
    queries = conse.embed_texts([q.text for q in SAMPLE_QUERIES])
    expected = np.array([names.index(q.expected) for q in SAMPLE_QUERIES])
    hits = _recall_at_1(queries @ gallery.T, expected)
    in_vocab = np.array([q.imagenet_concept for q in SAMPLE_QUERIES])
    best = (queries @ gallery.T).argmax(axis=1)
    for q, hit, b in zip(SAMPLE_QUERIES, hits, best, strict=True):
        print(f"  {'ok ' if hit else 'MISS'} {q.text!r} -> {names[b]}")
    print(
        f"ConSE text->image recall@1: in-vocabulary {hits[in_vocab].mean():.3f} "
        f"({hits[in_vocab].sum()}/{in_vocab.sum()}), all {hits.mean():.3f} "
        f"({hits.sum()}/{len(hits)}) over {len(photos)} photos"
    )
    assert hits[in_vocab].mean() >= 0.85
    assert hits.mean() >= 0.70


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def test_conse_near_duplicate_retrieval(
    conse: ConSEEmbedder, photos: list[SamplePhoto], photo_probs: np.ndarray
) -> None:
    gallery = conse.image_vectors_from_proba(photo_probs)
    flipped = [p.image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for p in photos]
    degraded = [
        _jpeg(im.resize((im.width * 4 // 5, im.height * 4 // 5), Image.Resampling.BILINEAR), 85)
        for im in flipped
    ]
    n = len(photos)
    for label, images in (("flip", flipped), ("flip+resize0.8+jpeg85", degraded)):
        sims = conse.embed_images(images) @ gallery.T
        hits = _recall_at_1(sims, np.arange(n))
        margin = np.diag(sims) - np.where(np.eye(n, dtype=bool), -np.inf, sims).max(axis=1)
        print(f"near-duplicate {label}: rank-1 {hits.sum()}/{n}, min margin {margin.min():+.3f}")
        assert hits.all(), [p.name for p, h in zip(photos, hits, strict=True) if not h]
