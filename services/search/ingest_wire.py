"""Lenient decoding of Ingest stream messages: one broken item must not end the call.

An `IngestRequest` is a chunk of items (field 1, repeated, length-delimited). When the
whole chunk parses, it is used as is. When it does not (typically invalid UTF-8 in one
item's `metadata_json` or `id`: protobuf refuses the entire message), the chunk is split
at the wire level and every item is parsed on its own, so the good items go on and each
broken one gets its own FAILED outcome at its stream index. Only a chunk whose framing
itself is broken (truncated, impossible wire types) still fails the call, because then
the number of items it held is unknown.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from mmsearch.search.v1 import search_pb2

_ITEMS_FIELD = search_pb2.IngestRequest.DESCRIPTOR.fields_by_name["items"].number
_WIRE_VARINT, _WIRE_FIXED64, _WIRE_LEN, _WIRE_FIXED32 = 0, 1, 2, 5


@dataclass(frozen=True)
class BrokenItem:
    """Stands in for an item whose bytes did not parse."""

    reason: str


@dataclass(frozen=True)
class SalvagedIngestRequest:
    """A chunk that did not parse as a whole: its items, each parsed or broken."""

    items: list[search_pb2.IngestItem | BrokenItem]


def decode_ingest_request(raw: bytes) -> search_pb2.IngestRequest | SalvagedIngestRequest:
    """Parses one Ingest chunk; raises `DecodeError` only when its framing is broken."""
    try:
        return search_pb2.IngestRequest.FromString(raw)
    except DecodeError:
        pass
    items: list[search_pb2.IngestItem | BrokenItem] = []
    for chunk in _item_bytes(raw):
        try:
            items.append(search_pb2.IngestItem.FromString(chunk))
        except DecodeError as e:
            items.append(BrokenItem(
                f"the item could not be decoded ({e}); string fields such as id and metadata_json must be valid UTF-8"))
    return SalvagedIngestRequest(items)


def _item_bytes(raw: bytes) -> Iterator[bytes]:
    """The encoded items of a chunk, in order; other (unknown) fields are skipped."""
    pos, end = 0, len(raw)
    while pos < end:
        key, pos = _varint(raw, pos)
        field, wire = key >> 3, key & 7
        if wire == _WIRE_VARINT:
            _, pos = _varint(raw, pos)
        elif wire == _WIRE_FIXED64:
            pos += 8
        elif wire == _WIRE_FIXED32:
            pos += 4
        elif wire == _WIRE_LEN:
            size, pos = _varint(raw, pos)
            if pos + size > end:
                raise DecodeError("truncated message")
            if field == _ITEMS_FIELD:
                yield raw[pos : pos + size]
            pos += size
        else:
            raise DecodeError(f"unsupported wire type {wire}")
        if pos > end:
            raise DecodeError("truncated message")


def _varint(raw: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(raw):
            raise DecodeError("truncated varint")
        byte = raw[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift >= 64:
            raise DecodeError("varint longer than 10 bytes")
