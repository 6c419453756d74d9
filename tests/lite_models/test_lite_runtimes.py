"""ONNX Runtime and OpenVINO paths of the lite models (services/lite_models/runtime.py):
the same outputs as torch on real photos and texts, the exported file cached and reused,
a corrupt cache file rebuilt. Real weights, no network."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from services.lite_models import runtime as rt
from services.lite_models.conse import ConSEEmbedder
from services.lite_models.imagenet import ImageNetClassifier
from services.lite_models.minilm import MiniLMTextEncoder
from services.lite_models.sample_photos import SAMPLE_QUERIES, SamplePhoto, load_sample_photos

RUNTIMES = ("onnx", "openvino")
MIN_COSINE = 0.9999

TEXTS = [q.text for q in SAMPLE_QUERIES] + [
    "",
    "a",
    "A tabby cat sleeping on a red sofa next to a cup of espresso, late afternoon light.",
    "Ein Hund läuft am Strand; 一只猫在雪地里 🐈",
    "rocket " * 400,  # truncated at 256 tokens
]


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.min((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the runtimes take torch's thread count; keep the tests light
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lite-runtime-cache")


@pytest.fixture(scope="module")
def photos() -> list[SamplePhoto]:
    return load_sample_photos()


@pytest.fixture(scope="module")
def torch_models() -> tuple[ImageNetClassifier, MiniLMTextEncoder]:
    return ImageNetClassifier(), MiniLMTextEncoder()


@pytest.fixture(scope="module", params=RUNTIMES)
def runtime_models(request: pytest.FixtureRequest, export_dir: Path) -> tuple[ImageNetClassifier, MiniLMTextEncoder]:
    pytest.importorskip("onnxruntime" if request.param == "onnx" else "openvino")
    return (
        ImageNetClassifier(runtime=request.param, cache_dir=export_dir),
        MiniLMTextEncoder(runtime=request.param, cache_dir=export_dir),
    )


@pytest.fixture(scope="module")
def conse_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The torch path's class vectors: both ConSE embedders below share them, so their image
    # vectors differ only by the classifier and their text vectors only by MiniLM (the class
    # vectors are MiniLM vectors, covered by the text check).
    return tmp_path_factory.mktemp("conse-cache")


def test_class_probabilities_match_torch(torch_models, runtime_models, photos: list[SamplePhoto]) -> None:
    images = [p.image for p in photos]
    ref = torch_models[0].predict_proba(images)
    got = runtime_models[0].predict_proba(images)
    assert got.shape == ref.shape == (len(photos), 1000) and got.dtype == np.float32
    assert min_cosine(got, ref) >= MIN_COSINE
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)
    assert (got.argmax(1) == ref.argmax(1)).all()
    # Batches split by max_batch_size and odd batch sizes (the dynamic axis) agree too.
    runtime_models[0].max_batch_size = 3
    try:
        assert min_cosine(runtime_models[0].predict_proba(images[:7]), ref[:7]) >= MIN_COSINE
    finally:
        runtime_models[0].max_batch_size = 64
    assert runtime_models[0].predict_proba([]).shape == (0, 1000)


def test_sentence_vectors_match_torch(torch_models, runtime_models) -> None:
    ref = torch_models[1].encode(TEXTS)
    got = runtime_models[1].encode(TEXTS)
    assert got.shape == ref.shape == (len(TEXTS), 384) and got.dtype == np.float32
    assert min_cosine(got, ref) >= MIN_COSINE
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # One at a time (batch 1, its own sequence length) equals the padded batch.
    assert min_cosine(np.concatenate([runtime_models[1].encode([t]) for t in TEXTS[:4]]), ref[:4]) >= MIN_COSINE


def test_conse_vectors_match_torch(torch_models, runtime_models, photos, conse_cache: Path) -> None:
    ref = ConSEEmbedder(*torch_models, prompt_template="a photo of a {}.", cache_dir=conse_cache)
    got = ConSEEmbedder(*runtime_models, prompt_template="a photo of a {}.", cache_dir=conse_cache)
    assert got.model_id == ref.model_id  # the runtime does not change the vector space
    images = [p.image for p in photos]
    assert min_cosine(got.embed_images(images), ref.embed_images(images)) >= MIN_COSINE
    texts = [q.text for q in SAMPLE_QUERIES]
    assert min_cosine(got.embed_texts(texts), ref.embed_texts(texts)) >= MIN_COSINE
    # Fresh class vectors from the runtime's MiniLM (a subset of the classes) match as well.
    names = torch_models[0].class_names[:64]
    prompts = [f"a photo of a {n}." for n in names]
    assert min_cosine(got.text_encoder.encode(prompts), ref.text_encoder.encode(prompts)) >= MIN_COSINE


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_cache_is_reused_then_a_corrupt_file_is_rebuilt(runtime: str, tmp_path: Path, photos) -> None:
    pytest.importorskip("onnxruntime" if runtime == "onnx" else "openvino")
    images = [p.image for p in photos[:3]]
    first = ImageNetClassifier(runtime=runtime, cache_dir=tmp_path)
    expected = first.predict_proba(images)
    [manifest] = list(tmp_path.glob(f"lite-efficientnet-lite0-{runtime}-*.json"))
    weights = manifest.with_suffix(".onnx" if runtime == "onnx" else ".bin")
    assert first._exported is not None and first._exported.path.stem == manifest.stem
    exports, mtime = rt.export_count, weights.stat().st_mtime_ns

    # Second load: straight from the files, no export, no write.
    again = ImageNetClassifier(runtime=runtime, cache_dir=tmp_path)
    assert rt.export_count == exports and weights.stat().st_mtime_ns == mtime
    assert again.model is None  # the torch module is not even loaded
    np.testing.assert_array_equal(again.predict_proba(images), expected)

    # Bytes flipped in the middle (the weights), a truncated file, a lost manifest: each is
    # detected, exported again, replaced atomically, and the outputs are right.
    data = bytearray(weights.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = os.urandom(64)
    for broken in (bytes(data), weights.read_bytes()[: len(data) // 3], None):
        if broken is None:
            manifest.unlink()
        else:
            weights.write_bytes(broken)
        before = rt.export_count
        rebuilt = ImageNetClassifier(runtime=runtime, cache_dir=tmp_path)
        assert rt.export_count == before + 1
        assert weights.read_bytes() != broken
        rt._check_cache(manifest)
        assert min_cosine(rebuilt.predict_proba(images), expected) >= MIN_COSINE
    assert not list(tmp_path.glob("*.tmp"))  # no temp file left behind


def test_cache_key_names_weights_runtime_and_export_version(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    base = rt.cache_path(tmp_path, "m", "w1", "onnx")
    assert base != rt.cache_path(tmp_path, "m", "w2", "onnx")
    assert base != rt.cache_path(tmp_path, "m", "w1", "openvino")
    assert base == rt.cache_path(tmp_path, "m", "w1", "onnx")
    version = rt.EXPORT_VERSION
    try:
        rt.EXPORT_VERSION = version + 1
        assert base != rt.cache_path(tmp_path, "m", "w1", "onnx")
    finally:
        rt.EXPORT_VERSION = version


def test_unknown_runtime_and_gpu_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown lite runtime"):
        ImageNetClassifier(runtime="tensorrt", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="runs on the CPU"):
        MiniLMTextEncoder(device="cuda", runtime="onnx", cache_dir=tmp_path)
