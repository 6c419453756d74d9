"""The search domain's ports: what the engine and the pipelines need from the embedder,
the captioner and the vector store, and the vocabulary of the store.

`upstreams.py` (gRPC clients) and `milvus_store.py` (Milvus) implement them; unit tests
implement them with in-memory fakes (tests/search/fakes.py).
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from services.common.content import Content
from services.common.deadline import Deadline
from services.common.errors import ServiceError
from services.search.domain import CaptionResult, EmbedderInfo


@dataclass(frozen=True)
class CollectionInfo:
    """What the collection records about itself."""

    model_id: str
    dimension: int
    # Collections created before deferred captions have no `caption_pending` field (and
    # Milvus Lite cannot add one): their rows are all "not pending" and Ingest cannot defer.
    has_caption_pending: bool
    # The keyword (BM25) leg; absent from collections created before it.
    has_keyword: bool = False
    # Typed metadata columns: name -> "string" | "int" | "float" | "bool".
    indexed_fields: dict[str, str] = field(default_factory=dict)
    # A `tenant` partition-key field; absent from collections created before tenants
    # (those serve the default tenant only).
    has_tenant: bool = False


@dataclass(frozen=True)
class LegQuery:
    """One searched field and what it is searched with: a dense vector, or text for BM25."""

    field: str  # F.IMAGE_VECTOR, F.CAPTION_VECTOR or F.KEYWORD_SPARSE
    data: np.ndarray | str
    weight: float = 1.0


@dataclass(frozen=True)
class DecaySpec:
    """A Milvus decay reranker over a numeric field (already resolved to the column)."""

    function: str  # gauss | exp | linear
    field: str
    origin: float
    scale: float
    offset: float = 0.0
    decay: float = 0.5


@dataclass(frozen=True)
class SearchOptions:
    """What every search shares besides its legs and page."""

    filter: str = ""
    output_fields: list[str] = field(default_factory=list)
    min_score: float | None = None
    group_by: tuple[str, int] | None = None
    decay: DecaySpec | None = None


@dataclass(frozen=True)
class StoredRow:
    """One item ready to write."""

    id: str
    content_sha256: str
    fingerprint: str
    uri: str
    caption: str
    keywords: list[str]
    metadata: dict[str, Any]
    embedder_model_id: str
    captioner_model_id: str
    ingested_at_ms: int
    image_vector: np.ndarray
    caption_vector: np.ndarray
    # The caption is still to be made (deferred): `caption_vector` is a placeholder (the
    # image vector, never searched: caption legs exclude pending rows).
    caption_pending: bool = False


@dataclass(frozen=True)
class RawHit:
    id: str
    score: float  # similarity: higher is better
    entity: dict[str, Any]



class Embedder(Protocol):
    """The embedding service as search sees it."""

    async def info(self) -> EmbedderInfo: ...

    async def embed(self, items: Sequence[Content], deadline: Deadline = ...) -> tuple[np.ndarray, str]:
        """(vectors [N, dim] float32, the model id that made them)."""
        ...

    async def health(self) -> bool | None: ...


class Captioner(Protocol):
    async def caption(self, image_bytes: bytes, deadline: Deadline = ...) -> CaptionResult: ...

    async def caption_batch(
        self, images: Sequence[bytes], deadline: Deadline = ...
    ) -> list[CaptionResult | ServiceError]:
        """One result per image, in order: its caption or its own error, the same error a
        `caption` call of that image alone would raise. Raises when the whole call fails."""
        ...

    async def model_id(self) -> str: ...

    async def health(self) -> bool | None: ...


class VectorStore(Protocol):
    """The collection: rows keyed by item id (scoped to the caller's tenant), searched by leg."""

    collection: str
    info: CollectionInfo | None

    @property
    def mode(self) -> str: ...
    @property
    def pending_supported(self) -> bool: ...
    def stored_key(self, item_id: str) -> str: ...
    def indexed_values(self, metadata: dict[str, Any]) -> dict[str, Any]: ...
    async def require(self) -> CollectionInfo: ...
    async def ensure_collection(self, model_id: str, dimension: int) -> None: ...
    async def fingerprints(self, ids: Sequence[str]) -> dict[str, str]: ...
    async def upsert(self, rows: Sequence[StoredRow]) -> None: ...
    async def get(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]: ...
    async def delete(self, ids: Sequence[str]) -> int: ...
    async def count(self) -> int: ...
    async def count_pending(self) -> int: ...
    async def index_type(self) -> str: ...
    async def pending_ids(self, limit: int) -> list[str]: ...
    async def rows_with_image_vector(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]: ...
    async def stored_vectors(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]: ...
    async def search(self, leg: LegQuery, top_k: int, offset: int, opts: SearchOptions) -> list[RawHit]: ...
    async def hybrid_search(
        self, legs: Sequence[LegQuery], top_k: int, offset: int, opts: SearchOptions, rrf_k: int, weighted: bool,
    ) -> list[RawHit]: ...
    def iterate(self, leg: LegQuery, opts: SearchOptions, batch_size: int, limit: int) -> AsyncIterator[
        list[RawHit]]: ...


class Index(Protocol):
    """The logical index: its live collection and the others Ingest also writes (a model
    change's candidate, the previous live one), each a VectorStore of one model."""

    index: str

    @property
    def mode(self) -> str: ...
    async def live(self) -> VectorStore: ...
    async def writers(self) -> Sequence[VectorStore]: ...
    async def ensure_live(self, model_id: str, dimension: int, servable: set[str]) -> None: ...
