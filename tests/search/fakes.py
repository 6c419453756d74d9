"""In-memory implementations of the search domain's ports (services/search/ports.py), for
unit tests of the engine and the ingest pipeline without gRPC or Milvus.

They keep the ports' contracts (an embedder answers with the model that made the vectors,
honours the caller's deadline; the store keys rows by id and ranks by cosine similarity),
and each can be told to fail, so the tests reach the paths real upstreams take rarely.
"""
from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from services.common.content import ComposedContent, Content, ImageContent, TextContent
from services.common.deadline import NO_DEADLINE, Deadline
from services.common.errors import DeadlineExceeded, FailedPrecondition, ServiceError
from services.common.intake import ImageIntake
from services.common.settings import UriSettings
from services.search import fields as F
from services.search.binding import EmbedderBinding
from services.search.domain import CaptionResult, EmbedderInfo
from services.search.ports import CollectionInfo, LegQuery, RawHit, SearchOptions, StoredRow
from services.search.settings import SearchSettings

DIM = 16


def jpeg(seed: int, side: int = 32) -> bytes:
    """A small distinct JPEG per seed."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def unit(key: str) -> np.ndarray:
    """A deterministic unit vector for any text or bytes key."""
    seed = int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def content_key(c: Content) -> str:
    if isinstance(c, TextContent):
        return "text:" + c.text
    if isinstance(c, ImageContent):
        return "image:" + hashlib.sha256(c.image.data or b"").hexdigest()
    assert isinstance(c, ComposedContent)
    return "composed:" + hashlib.sha256(c.image.data or b"").hexdigest() + c.instruction


@dataclass
class FakeEmbedder:
    model_id: str = "fake-embedder-a"
    delay_s: float = 0.0
    # Per content: an error to raise for the whole call (as the real embedder refuses a
    # batch with one bad item), or None.
    refuse: Callable[[Content], ServiceError | None] = lambda c: None
    down: ServiceError | None = None  # every call fails with this
    calls: list[list[Content]] = field(default_factory=list)

    async def info(self) -> EmbedderInfo:
        if self.down is not None:
            raise self.down
        return EmbedderInfo(self.model_id, DIM, False, 64)

    async def embed(self, items: Sequence[Content], deadline: Deadline = NO_DEADLINE) -> tuple[np.ndarray, str]:
        self.calls.append(list(items))
        if self.down is not None:
            raise self.down
        for i, c in enumerate(items):
            if (e := self.refuse(c)) is not None:
                raise type(e)(f"item {i}: {e.message}")
        if self.delay_s:
            left = deadline.remaining()
            if left is not None and left < self.delay_s:
                await asyncio.sleep(max(0.0, left))
                raise DeadlineExceeded("embedder: deadline exceeded")
            await asyncio.sleep(self.delay_s)
        return np.stack([unit(content_key(c)) for c in items]), self.model_id

    async def health(self) -> bool | None:
        return self.down is None


@dataclass
class FakeCaptioner:
    down: ServiceError | None = None
    calls: int = 0  # images captioned (one per `caption`, one per image of a batch)
    batches: list[int] = field(default_factory=list)  # images per `caption_batch` call
    # Per image (by its bytes' SHA-256): the error its caption gets; the rest of a batch is captioned.
    item_errors: dict[str, ServiceError] = field(default_factory=dict)

    async def caption(self, image_bytes: bytes, deadline: Deadline = NO_DEADLINE) -> CaptionResult:
        self.calls += 1
        if self.down is not None:
            raise self.down
        deadline.check("the caption was made")
        sha = hashlib.sha256(image_bytes).hexdigest()
        if sha in self.item_errors:
            raise self.item_errors[sha]
        tag = sha[:8]
        return CaptionResult(f"a photo {tag}", ["photo", tag], "fake-captioner")

    async def caption_batch(
        self, images: Sequence[bytes], deadline: Deadline = NO_DEADLINE
    ) -> list[CaptionResult | ServiceError]:
        self.batches.append(len(images))
        if self.down is not None:  # the whole call fails
            self.calls += len(images)
            raise self.down
        out: list[CaptionResult | ServiceError] = []
        for data in images:
            try:
                out.append(await self.caption(data, deadline))
            except ServiceError as e:
                out.append(e)
        return out

    async def model_id(self) -> str:
        return "fake-captioner"

    async def health(self) -> bool | None:
        return self.down is None


@dataclass
class FakeStore:
    """The VectorStore port in memory: rows by id, brute-force cosine ranking."""

    collection: str = "fake"
    info: CollectionInfo | None = None
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    upserts: list[int] = field(default_factory=list)  # rows per upsert call
    down: ServiceError | None = None

    @property
    def mode(self) -> str:
        return "fake"

    @property
    def pending_supported(self) -> bool:
        return True

    def stored_key(self, item_id: str) -> str:
        return item_id

    def indexed_values(self, metadata: dict[str, Any]) -> dict[str, Any]:
        return {}

    def _check(self) -> None:
        if self.down is not None:
            raise self.down

    async def require(self) -> CollectionInfo:
        self._check()
        assert self.info is not None, "bind the embedder first"
        return self.info

    async def ensure_collection(self, model_id: str, dimension: int) -> None:
        self._check()
        if self.info is None:
            self.info = CollectionInfo(model_id, dimension, has_caption_pending=True, has_keyword=True)
        elif self.info.model_id != model_id:
            raise FailedPrecondition(f"collection {self.collection!r} was built by embedding model "
                                     f"{self.info.model_id!r}, not {model_id!r}")

    async def fingerprints(self, ids: Sequence[str]) -> dict[str, str]:
        self._check()
        return {i: self.rows[i]["fingerprint"] for i in ids if i in self.rows}

    async def upsert(self, rows: Sequence[StoredRow]) -> None:
        self._check()
        self.upserts.append(len(rows))
        for r in rows:
            self.rows[r.id] = dict(r.__dict__)

    async def get(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        return {i: self.rows[i] for i in ids if i in self.rows}

    async def delete(self, ids: Sequence[str]) -> int:
        return sum(self.rows.pop(i, None) is not None for i in ids)

    async def count(self) -> int:
        return len(self.rows)

    async def count_pending(self) -> int:
        return sum(bool(r["caption_pending"]) for r in self.rows.values())

    async def index_type(self) -> str:
        return "FLAT"

    async def pending_ids(self, limit: int) -> list[str]:
        return sorted(i for i, r in self.rows.items() if r["caption_pending"])[:limit]

    async def rows_with_image_vector(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        return await self.get(ids)

    async def stored_vectors(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        return await self.get(ids)

    def _ranked(self, leg: LegQuery, opts: SearchOptions) -> list[RawHit]:
        assert isinstance(leg.data, np.ndarray), "the fake store ranks dense legs only"
        hits = [
            RawHit(i, float(np.dot(r[leg.field], leg.data)), {f: r.get(f) for f in opts.output_fields})
            for i, r in self.rows.items()
            if not (leg.field == F.CAPTION_VECTOR and r["caption_pending"])
        ]
        hits.sort(key=lambda h: -h.score)
        return [h for h in hits if opts.min_score is None or h.score >= opts.min_score]

    async def search(self, leg: LegQuery, top_k: int, offset: int, opts: SearchOptions) -> list[RawHit]:
        self._check()
        return self._ranked(leg, opts)[offset: offset + top_k]

    async def hybrid_search(
        self, legs: Sequence[LegQuery], top_k: int, offset: int, opts: SearchOptions, rrf_k: int, weighted: bool,
    ) -> list[RawHit]:
        self._check()
        fused: dict[str, float] = {}
        entity: dict[str, dict[str, Any]] = {}
        for leg in legs:
            for rank, h in enumerate(self._ranked(leg, opts)):
                fused[h.id] = fused.get(h.id, 0.0) + (leg.weight * h.score if weighted else 1 / (rrf_k + rank + 1))
                entity[h.id] = h.entity
        order = sorted(fused, key=lambda i: -fused[i])[offset: offset + top_k]
        return [RawHit(i, fused[i], entity[i]) for i in order]

    async def iterate(self, leg: LegQuery, opts: SearchOptions, batch_size: int, limit: int) -> AsyncIterator[
            list[RawHit]]:
        ranked = self._ranked(leg, opts)[: limit or None]
        for start in range(0, len(ranked), batch_size):
            yield ranked[start: start + batch_size]


@dataclass
class FakeIndex:
    """The Index port over in-memory stores: one live, and any others Ingest also writes."""

    store: FakeStore
    others: list[FakeStore] = field(default_factory=list)
    index: str = "fake"
    mode: str = "fake"

    async def live(self) -> FakeStore:
        await self.store.require()
        return self.store

    async def writers(self) -> list[FakeStore]:
        return list(self.others)

    async def ensure_live(self, model_id: str, dimension: int, servable: set[str]) -> None:
        if self.store.info is not None and self.store.info.model_id in servable:
            return
        await self.store.ensure_collection(model_id, dimension)


@dataclass
class Ports:
    settings: SearchSettings
    embedder: FakeEmbedder
    captioner: FakeCaptioner
    store: FakeStore
    index: FakeIndex
    binding: EmbedderBinding
    intake: ImageIntake


async def bound_ports(settings: SearchSettings | None = None, **embedder: Any) -> Ports:
    """Fakes with the embedder bound to the store (the model guard passed)."""
    s = settings or SearchSettings(batch_wait_ms=5, embed_batch_max_wait_ms=20)
    emb, store = FakeEmbedder(**embedder), FakeStore()
    index = FakeIndex(store)
    binding = EmbedderBinding(emb, index, "fake-embedder:0")
    await binding.bind_forever()
    return Ports(s, emb, FakeCaptioner(), store, index, binding, ImageIntake(s.images, UriSettings()))
