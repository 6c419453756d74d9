"""Property-based tests (hypothesis) over request decoding: whatever a caller sends, the
decoding and validation code either returns a well-formed domain value or raises
`InvalidInput` (INVALID_ARGUMENT with a message) — never another exception, which would
surface as INTERNAL.

The caption parser already has its property tests (tests/captioner/test_parsing.py:
never crashes, keywords clean, labelled keywords round-trip); they are not repeated here.
"""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mmsearch.captioner.v1 import captioner_pb2
from mmsearch.common.v1 import types_pb2
from mmsearch.search.v1 import search_pb2
from services.captioner.servicer import request_from_proto
from services.common.content import ComposedContent, ImageContent, TextContent
from services.common.convert import content_from_proto, content_to_proto, embedding_from_proto
from services.common.errors import InvalidInput
from services.common.images import DecodedImage, decode_image
from services.common.intake import ImageIntake
from services.common.settings import ImageLimits, UriSettings
from services.search import fields as F
from services.search.binding import EmbedderBinding
from services.search.catalog import check_ids
from services.search.engine import SearchEngine
from services.search.servicer import _ingest_item, _query
from services.search.settings import SearchSettings
from services.search.validation import check_filter, check_id, check_vector, parse_metadata
from tests.search.fakes import FakeEmbedder, FakeIndex, FakeStore

# Mutated TIFFs make Pillow warn about corrupt tags: expected, and not errors.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SOME = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- strategies -------------------------------------------------------------------------------

any_text = st.text(max_size=200)
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
images = st.one_of(
    st.builds(lambda d: types_pb2.Image(data=d), st.binary(max_size=64)),
    st.builds(lambda u: types_pb2.Image(uri=u), any_text),
    st.just(types_pb2.Image()),
)


@st.composite
def contents(draw: st.DrawFn) -> types_pb2.Content:
    kind = draw(st.sampled_from(["text", "image", "composed", "composed-no-image", "empty"]))
    if kind == "text":
        return types_pb2.Content(text=draw(any_text))
    if kind == "image":
        return types_pb2.Content(image=draw(images))
    if kind == "composed":
        return types_pb2.Content(composed=types_pb2.Composed(
            image=draw(images), instruction=draw(any_text), instruction_weight=draw(floats)))
    if kind == "composed-no-image":
        return types_pb2.Content(composed=types_pb2.Composed(instruction=draw(any_text)))
    return types_pb2.Content()


@st.composite
def search_requests(draw: st.DrawFn) -> search_pb2.SearchRequest:
    request = search_pb2.SearchRequest(
        target=draw(st.integers(-5, 10)),
        top_k=draw(st.integers(-(2**31), 2**31 - 1) | st.integers(-2, 1200)),
        offset=draw(st.integers(-(2**31), 2**31 - 1) | st.integers(-2, 20000)),
        filter=draw(st.text(max_size=80) | st.text(min_size=2040, max_size=2060, alphabet="ab (')")),
        output_fields=draw(st.lists(st.sampled_from([*F.OUTPUT_FIELDS, "vector", "", "id; drop"]), max_size=4)),
        fusion=search_pb2.Fusion(method=draw(st.integers(-3, 6)), rrf_k=draw(st.integers(0, 2**32 - 1)),
                                 image_weight=draw(floats), caption_weight=draw(floats)),
    )
    if draw(st.booleans()):
        request.query.CopyFrom(draw(contents()))
    if draw(st.booleans()):
        request.query_vector.values.extend(draw(st.lists(floats, max_size=10)))
    return request


def json_values(max_leaves: int = 30) -> st.SearchStrategy[object]:
    leaves = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | any_text
    return st.recursive(leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
                        max_leaves=max_leaves)


# --- services/common/convert.py ----------------------------------------------------------------


@FAST
@given(contents())
def test_content_decoding_returns_content_or_invalid_input(msg: types_pb2.Content) -> None:
    try:
        content = content_from_proto(msg)
    except InvalidInput as e:
        assert e.message
        return
    assert isinstance(content, TextContent | ImageContent | ComposedContent)
    if isinstance(content, ComposedContent):
        assert 0.0 <= content.instruction_weight <= 1.0  # NaN and inf never pass
    # What was accepted survives the trip back to protobuf (what search sends the embedder);
    # an empty image (uri "" or data b"") stays empty and is refused by intake either way.
    image = getattr(content, "image", None)
    if image is None or image.uri or image.data:
        assert content_from_proto(content_to_proto(content)) == content


@FAST
@given(st.binary(max_size=300))
def test_arbitrary_bytes_as_content(raw: bytes) -> None:
    try:
        msg = types_pb2.Content.FromString(raw)
    except DecodeError:
        return  # refused by the gRPC layer: INVALID_ARGUMENT (see the error interceptor)
    try:
        content_from_proto(msg)
    except InvalidInput:
        pass


@FAST
@given(st.lists(floats, max_size=50))
def test_embedding_decoding_keeps_length(values: list[float]) -> None:
    msg = types_pb2.Embedding(values=values)
    vector = embedding_from_proto(msg)
    assert vector.dtype == np.float32 and vector.shape == (len(values),)


# --- services/search/validation.py --------------------------------------------------------------


@FAST
@given(st.text(max_size=300) | json_values().map(json.dumps))
def test_metadata_is_a_bounded_object_or_invalid_input(text: str) -> None:
    try:
        value = parse_metadata(text, max_bytes=2048, max_depth=4)
    except InvalidInput as e:
        assert e.message
        return
    assert isinstance(value, dict)
    assert len(json.dumps(value).encode()) <= 4 * 2048  # re-encoding may escape, never explode

    def depth(v: object) -> int:
        if isinstance(v, dict):
            return 1 + max((depth(x) for x in v.values()), default=0)
        if isinstance(v, list):
            return 1 + max((depth(x) for x in v), default=0)
        return 0

    assert depth(value) <= 4


@SOME
@given(st.integers(1, 200_000), st.sampled_from(["[", '{"a":']))
def test_deep_nesting_is_invalid_input_never_recursion_error(levels: int, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    text = '{"a":' + opener * levels + "1" + closer * levels + "}"
    try:
        parse_metadata(text, max_bytes=10 * 1024 * 1024, max_depth=8)
    except InvalidInput as e:
        assert "nest" in e.message or "JSON" in e.message
    else:
        assert levels <= 7


@FAST
@given(st.text(max_size=3000))
def test_filter_is_bounded_and_free_of_control_characters(expr: str) -> None:
    try:
        out = check_filter(expr, max_chars=2048)
    except InvalidInput as e:
        assert "filter" in e.message
        return
    assert len(out) <= 2048
    assert not any(ord(c) < 32 and c not in "\t\n\r" for c in out)


@FAST
@given(st.text(max_size=300))
def test_ids_that_pass_cannot_break_out_of_an_expression(item_id: str) -> None:
    try:
        assert check_id(item_id) == item_id
    except InvalidInput as e:
        assert "is invalid" in e.message
        return
    assert 1 <= len(item_id) <= F.MAX_ID_CHARS
    assert not set(item_id) & set("'\"\\[](){} \t\n,;=!<>&|%")


@FAST
@given(st.lists(floats, max_size=12), st.integers(1, 12))
def test_query_vector_is_finite_nonzero_of_the_right_dimension(values: list[float], dim: int) -> None:
    try:
        vector = check_vector(values, dim)
    except InvalidInput:
        return
    norm = float(np.linalg.norm(vector))
    assert vector.shape == (dim,) and np.all(np.isfinite(vector)) and 0 < norm < math.inf


@FAST
@given(st.lists(st.text(max_size=30), max_size=1200))
def test_get_delete_ids_are_bounded_and_valid(ids: list[str]) -> None:
    try:
        out = check_ids(ids)
    except InvalidInput:
        return
    assert 1 <= len(out) <= 1000 and all(check_id(i) == i for i in out)


# --- search request decoding (servicer + engine validation) ---------------------------------------


ENGINE = SearchEngine(SearchSettings(), FakeIndex(FakeStore()), ImageIntake(ImageLimits(), UriSettings()),
                      EmbedderBinding(FakeEmbedder(), FakeIndex(FakeStore()), "fake"))


@FAST
@given(search_requests())
def test_search_request_decoding_and_validation_raise_only_invalid_input(request: search_pb2.SearchRequest) -> None:
    try:
        query = _query(request)
        ENGINE._validate_page(query)
        names, expr = ENGINE._validate(query)
    except InvalidInput as e:
        assert e.message
        return
    top_k = query.top_k
    assert 1 <= top_k <= 1000 and 0 <= query.offset and query.offset + top_k <= 16384
    assert set(names) <= set(F.OUTPUT_FIELDS) and len(expr) <= 2048
    given = [query.content is not None, query.vector is not None, bool(query.like_id), bool(query.examples)]
    assert sum(given) == 1


@FAST
@given(st.binary(max_size=400))
def test_arbitrary_bytes_as_search_request(raw: bytes) -> None:
    try:
        request = search_pb2.SearchRequest.FromString(raw)
    except DecodeError:
        return
    try:
        ENGINE._validate(_query(request))
    except InvalidInput:
        pass


@FAST
@given(st.builds(search_pb2.IngestItem, image=images, id=any_text, metadata_json=any_text, source_uri=any_text))
def test_ingest_item_decoding_never_raises(item: search_pb2.IngestItem) -> None:
    """Ingest turns every item into a domain item; problems become that item's FAILED outcome."""
    decoded = _ingest_item(7, item)
    assert decoded.index == 7


@FAST
@given(st.builds(captioner_pb2.CaptionRequest, image=images, prompt=any_text, language=st.integers(-3, 9),
                 max_words=st.integers(0, 2**32 - 1)))
def test_caption_request_decoding_raises_only_invalid_input(msg: captioner_pb2.CaptionRequest) -> None:
    try:
        request_from_proto(msg)
    except InvalidInput as e:
        assert e.message


# --- services/common/images.py -----------------------------------------------------------------

LIMITS = ImageLimits(max_bytes=256 * 1024, max_pixels=1_000_000)


def _seed_images() -> list[bytes]:
    out = []
    img = Image.new("RGB", (24, 16), (10, 200, 30))
    for fmt, kw in [("PNG", {}), ("JPEG", {"quality": 80}), ("GIF", {}), ("WEBP", {}), ("BMP", {}), ("TIFF", {})]:
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        out.append(buf.getvalue())
    return out


SEEDS = _seed_images()


def _decode_only_invalid_input(data: bytes) -> None:
    try:
        decoded = decode_image(data, LIMITS)
    except InvalidInput as e:
        assert e.message
        return
    assert isinstance(decoded, DecodedImage)
    assert decoded.image.mode == "RGB" and decoded.width * decoded.height <= LIMITS.max_pixels


@FAST
@given(st.binary(max_size=2048))
def test_decoding_random_bytes_raises_only_invalid_input(data: bytes) -> None:
    _decode_only_invalid_input(data)


@SOME
@given(st.sampled_from(SEEDS), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
       st.integers(0, 10**6) | st.none())
def test_decoding_mutated_images_raises_only_invalid_input(seed: bytes, flips: list[tuple[int, int]],
                                                          cut: int | None) -> None:
    """Valid images with bytes overwritten (headers included) and cut short anywhere."""
    data = bytearray(seed)
    for at, value in flips:
        data[at % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    _decode_only_invalid_input(bytes(data))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_are_refused(value: float) -> None:
    msg = types_pb2.Content(composed=types_pb2.Composed(image=types_pb2.Image(data=b"x"), instruction="i",
                                                        instruction_weight=value))
    with pytest.raises(InvalidInput, match="instruction_weight"):
        content_from_proto(msg)
