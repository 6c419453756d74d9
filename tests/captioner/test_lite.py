"""The offline lite backend on real photos bundled with scikit-image, through gRPC."""

from __future__ import annotations

import io

import grpc
import pytest

from mmsearch.captioner.v1 import captioner_pb2
from services.captioner.backends.lite import LiteBackend, describe
from services.lite_models.imagenet import ImageNetClassifier
from services.lite_models.sample_photos import load_sample_photos
from tests.captioner.conftest import caption_request, make_settings, metric, serve

# ImageNet classes that are a right answer for each bundled photo (the model may rank
# any of them first; the test asks that one of them is among the keywords).
EXPECTED = {
    "cat": {"tabby cat", "tiger cat", "cat having a striped coat", "egyptian mau", "persian cat", "siamese cat"},
    "coffee": {"espresso", "coffee mug", "cup", "tea cup", "cappuccino"},
    "rocket": {"missile", "projectile", "space shuttle", "rocket"},
}


@pytest.fixture(scope="module")
def classifier() -> ImageNetClassifier:
    return ImageNetClassifier()


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    out = {}
    for photo in load_sample_photos(list(EXPECTED)):
        buf = io.BytesIO()
        photo.image.convert("RGB").save(buf, format="JPEG", quality=92)
        out[photo.name] = buf.getvalue()
    return out


async def test_keywords_name_the_right_imagenet_concept(
    classifier: ImageNetClassifier, photos: dict[str, bytes]
) -> None:
    settings = make_settings(backend="lite")
    async with serve(settings, LiteBackend(settings, classifier)) as s:
        info = await s.stub.Info(captioner_pb2.InfoRequest(), timeout=5)
        assert (info.backend, info.model_id) == ("lite", "efficientnet-lite0-imagenet1k")
        batch = captioner_pb2.CaptionBatchRequest(requests=[caption_request(photos[name]) for name in EXPECTED])
        response = await s.stub.CaptionBatch(batch, timeout=30)
    for name, result in zip(EXPECTED, response.results, strict=True):
        caption = result.caption
        assert result.WhichOneof("outcome") == "caption", result
        assert set(caption.keywords) & EXPECTED[name], (name, list(caption.keywords))
        assert caption.model_id == "efficientnet-lite0-imagenet1k"
        assert "%" in caption.description  # states its confidence
        assert caption.raw_text.count("\t") >= len(caption.keywords)  # label<TAB>probability lines
        assert len(set(caption.keywords)) == len(caption.keywords) and all(k == k.lower() for k in caption.keywords)


async def test_confident_photo_is_described_plainly(classifier: ImageNetClassifier, photos: dict[str, bytes]) -> None:
    settings = make_settings(backend="lite")
    before = metric("captioner_captions_total", backend="lite", outcome="ok")
    async with serve(settings, LiteBackend(settings, classifier)) as s:
        response = await s.stub.Caption(caption_request(photos["coffee"]), timeout=30)
        again = await s.stub.Caption(caption_request(photos["coffee"]), timeout=30)
    assert response.caption.description.startswith("Most likely an espresso (")
    assert response.caption.keywords[0] == "espresso"
    assert again.caption.cached
    assert metric("captioner_captions_total", backend="lite", outcome="ok") == before + 2


def test_descriptions_are_honest_about_confidence() -> None:
    assert describe([("tabby cat", 0.39), ("tiger cat", 0.36), ("lynx", 0.01)]) == (
        "Possibly a tabby cat (39%) or a tiger cat (36%)."
    )
    assert describe([("espresso", 0.95)]) == "Most likely an espresso (95%)."
    assert describe([("a cat having a striped coat", 0.38), ("Egyptian Mau", 0.37)]) == (
        "Possibly a cat having a striped coat (38%) or an Egyptian Mau (37%)."
    )
    low = describe([("nematode", 0.12), ("bubble", 0.10), ("sink", 0.03)])
    assert low.startswith("Unclear image; low-confidence guesses:") and "nematode (12%)" in low


async def test_lite_bad_image_is_invalid_argument(classifier: ImageNetClassifier) -> None:
    settings = make_settings(backend="lite")
    async with serve(settings, LiteBackend(settings, classifier)) as s:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.stub.Caption(caption_request(b"\x89PNG\r\n\x1a\n not really"), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
