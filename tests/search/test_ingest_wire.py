"""The lenient Ingest decoder: whole chunks unchanged, broken items isolated, broken
framing refused (never anything but DecodeError)."""
from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from mmsearch.common.v1 import types_pb2
from mmsearch.search.v1 import search_pb2
from services.search.ingest_wire import BrokenItem, SalvagedIngestRequest, decode_ingest_request

MARK = "\x01\x02\x03\x04"  # replaced by invalid UTF-8 of the same length on the wire


def item(n: int, **kw: str) -> search_pb2.IngestItem:
    return search_pb2.IngestItem(image=types_pb2.Image(data=bytes([n]) * 10), id=f"item-{n}", **kw)


def test_a_good_chunk_is_the_generated_message() -> None:
    chunk = search_pb2.IngestRequest(items=[item(1), item(2, metadata_json='{"a": 1}')])
    decoded = decode_ingest_request(chunk.SerializeToString())
    assert isinstance(decoded, search_pb2.IngestRequest) and decoded == chunk


def test_invalid_utf8_breaks_only_its_own_item() -> None:
    chunk = search_pb2.IngestRequest(items=[item(1), item(2, metadata_json=MARK), item(3)])
    raw = chunk.SerializeToString().replace(MARK.encode(), b"\xff\xfe\xc3\x28")
    with pytest.raises(DecodeError):
        search_pb2.IngestRequest.FromString(raw)  # what the generated parser does
    decoded = decode_ingest_request(raw)
    assert isinstance(decoded, SalvagedIngestRequest)
    first, broken, third = decoded.items
    assert first == item(1) and third == item(3)
    assert isinstance(broken, BrokenItem) and "valid UTF-8" in broken.reason


@pytest.mark.parametrize("raw", [
    search_pb2.IngestRequest(items=[item(1)]).SerializeToString()[:-3],  # truncated item
    b"\x0a\xff\xff\xff\xff\x0f",  # length far past the end
    b"\x0b",  # wire type 3 (groups) is never valid here
    b"\x08" + b"\xff" * 11,  # endless varint
])
def test_broken_framing_is_refused(raw: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_ingest_request(raw)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=64), st.text(max_size=20), st.text(max_size=40)), max_size=6),
       st.integers(min_value=0, max_value=2**40))
def test_salvaging_keeps_every_item_in_order(fields: list[tuple[bytes, str, str]], unknown: int) -> None:
    items = [search_pb2.IngestItem(image=types_pb2.Image(data=d), id=i, metadata_json=m) for d, i, m in fields]
    raw = search_pb2.IngestRequest(items=items).SerializeToString()
    # An unknown varint field (as a newer client might send) must be skipped, not counted.
    raw += bytes([(9 << 3) | 0]) + _varint(unknown)
    raw += b"\x0a\x02\xff\xff"  # and one more item whose bytes cannot parse
    decoded = decode_ingest_request(raw)
    assert isinstance(decoded, SalvagedIngestRequest)
    assert decoded.items[:-1] == items
    assert isinstance(decoded.items[-1], BrokenItem)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_raise_decode_error(raw: bytes) -> None:
    try:
        decoded = decode_ingest_request(raw)
    except DecodeError:
        return
    assert isinstance(decoded, (search_pb2.IngestRequest, SalvagedIngestRequest))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)
