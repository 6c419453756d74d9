"""Search: validate, embed the query once, search the chosen vector field(s), page."""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from services.common.admission import AdmissionLimiter
from services.common.convert import Content, ComposedContent, ImageContent, TextContent
from services.common.errors import DeadlineExceeded, FailedPrecondition, InvalidInput
from services.common.intake import ImageIntake, ImageRef
from services.search import fields as F
from services.search.metrics import SEARCH_SECONDS, SEARCH_STAGE_SECONDS
from services.search.milvus_store import MilvusStore, RawHit
from services.search.settings import SearchSettings
from services.search.upstreams import EmbedderClient
from services.search.validation import check_filter, check_vector


class Target(str, Enum):
    IMAGE = "image"
    CAPTION = "caption"
    HYBRID = "hybrid"


@dataclass(frozen=True)
class Fusion:
    weighted: bool = False
    rrf_k: int = 60
    image_weight: float = 0.5
    caption_weight: float = 0.5


@dataclass(frozen=True)
class SearchQuery:
    content: Content | None = None
    vector: list[float] | None = None
    target: Target = Target.IMAGE
    fusion: Fusion = field(default_factory=Fusion)
    top_k: int = 10
    offset: int = 0
    filter: str = ""
    output_fields: tuple[str, ...] = ()


@dataclass(frozen=True)
class Hit:
    rank: int
    id: str
    score: float
    fields: dict[str, Any]  # caller-facing names (see fields.OUTPUT_FIELDS)


@dataclass(frozen=True)
class SearchResult:
    hits: list[Hit]
    target: Target
    embed_ms: float
    milvus_ms: float
    total_ms: float


def mode_label(query: SearchQuery) -> str:
    """'text->image', 'composed->hybrid', ... for metrics."""
    kind = {TextContent: "text", ImageContent: "image", ComposedContent: "composed"}.get(type(query.content), "vector")
    return f"{kind}->{query.target.value}"


def _no_gate() -> None:
    return None


class SearchEngine:
    """`embedder_gate` raises when queries cannot be embedded now (embedder unreachable, or
    not bound to the collection's model yet): such calls fail at once, before taking an
    admission slot. `bound_model_id` is the model the collection was built by ("" while
    unknown); query_vector searches need only Milvus (the collection gives the dimension).
    """

    def __init__(
        self, settings: SearchSettings, store: MilvusStore, embedder: EmbedderClient, intake: ImageIntake,
        embedder_gate: Callable[[], None] = _no_gate, bound_model_id: Callable[[], str] = lambda: "",
    ) -> None:
        self.settings = settings
        self.store = store
        self.embedder = embedder
        self.intake = intake
        self.embedder_gate = embedder_gate
        self.bound_model_id = bound_model_id
        self.limiter = AdmissionLimiter(settings.max_concurrent_searches, settings.max_waiting_searches, "searches")

    def _validate(self, q: SearchQuery) -> tuple[int, list[str], str]:
        s = self.settings
        top_k = q.top_k
        if not 1 <= top_k <= s.max_top_k:
            raise InvalidInput(f"top_k must be between 1 and {s.max_top_k}, got {q.top_k}")
        if q.offset < 0:
            raise InvalidInput(f"offset must be >= 0, got {q.offset}")
        if q.offset + top_k > s.max_window:
            raise InvalidInput(f"offset + top_k must be at most {s.max_window}, got {q.offset + top_k}")
        if (q.content is None) == (q.vector is None):
            raise InvalidInput("set exactly one of query and query_vector")
        if isinstance(q.content, TextContent) and not q.content.text.strip():
            raise InvalidInput("query text is empty")
        if isinstance(q.content, ComposedContent) and not q.content.instruction.strip():
            raise InvalidInput("composed query has an empty instruction")
        unknown = [f for f in q.output_fields if f not in F.OUTPUT_FIELDS]
        if unknown:
            raise InvalidInput(f"unknown output fields {unknown}; known: {sorted(F.OUTPUT_FIELDS)}")
        names = list(q.output_fields) or list(F.OUTPUT_FIELDS)
        fuse = q.fusion
        if q.target is Target.HYBRID:
            if not 0 < fuse.rrf_k < 16384:
                raise InvalidInput(f"fusion.rrf_k must be in (0, 16384), got {fuse.rrf_k}")
            if fuse.weighted and not (0 <= fuse.image_weight <= 1 and 0 <= fuse.caption_weight <= 1):
                raise InvalidInput("fusion weights must be in [0, 1]")
        return top_k, names, check_filter(q.filter, s.max_filter_chars)

    async def _query_vector(self, q: SearchQuery, deadline: float | None = None) -> np.ndarray:
        if q.vector is not None:
            return check_vector(q.vector, (await self.store.require()).dimension)
        content = q.content
        assert content is not None
        # Fetch URIs here (under our file-root / SSRF rules) and send bytes upstream.
        if isinstance(content, ImageContent | ComposedContent) and content.image.uri:
            data = await self.intake.read(content.image)
            content = (
                ImageContent(ImageRef(data=data)) if isinstance(content, ImageContent)
                else ComposedContent(ImageRef(data=data), content.instruction, content.instruction_weight)
            )
        # The caller's deadline goes downstream (gRPC does not propagate it by itself).
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded("the Search call's deadline passed before the query was embedded")
        vectors, model = await self.embedder.embed([content], timeout_s=remaining)
        bound = self.bound_model_id()
        if bound and model != bound:
            raise FailedPrecondition(f"embedder now serves {model!r}, the collection was built by {bound!r}")
        return vectors[0]

    async def search(self, q: SearchQuery, time_remaining_s: float | None = None) -> SearchResult:
        # total_ms covers the whole call (validation, the wait for admission, hit building),
        # so total - embed - milvus is the service's own share (bench/search_overhead.py).
        entered = time.perf_counter()
        top_k, names, expr = self._validate(q)
        deadline = None if time_remaining_s is None else time.monotonic() + time_remaining_s
        if q.content is not None:
            self.embedder_gate()  # fail fast, holding no admission slot
        async with self.limiter.admit():
            start = time.perf_counter()
            vector = await self._query_vector(q, deadline)
            embedded = time.perf_counter()
            milvus_fields = [F.OUTPUT_FIELDS[n] for n in names
                             if n != F.CAPTION_PENDING or self.store.pending_supported]
            if q.target is Target.HYBRID:
                weights = (q.fusion.image_weight, q.fusion.caption_weight) if q.fusion.weighted else None
                raw = await self.store.hybrid_search(
                    vector, top_k, q.offset, expr, milvus_fields, q.fusion.rrf_k, weights
                )
            else:
                anns = F.IMAGE_VECTOR if q.target is Target.IMAGE else F.CAPTION_VECTOR
                raw = await self.store.search(vector, anns, top_k, q.offset, expr, milvus_fields)
            done = time.perf_counter()
        mode = mode_label(q)
        SEARCH_SECONDS.labels(mode).observe(done - start)
        SEARCH_STAGE_SECONDS.labels(mode, "embed").observe(embedded - start)
        SEARCH_STAGE_SECONDS.labels(mode, "milvus").observe(done - embedded)
        hits = [self._hit(q.offset + i + 1, h, names) for i, h in enumerate(raw[:top_k])]
        total_ms = (time.perf_counter() - entered) * 1000
        return SearchResult(hits, q.target, (embedded - start) * 1000, (done - embedded) * 1000, total_ms)

    @staticmethod
    def _hit(rank: int, raw: RawHit, names: list[str]) -> Hit:
        return Hit(rank, raw.id, raw.score, {n: raw.entity.get(F.OUTPUT_FIELDS[n]) for n in names})


def metadata_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True) if value else ""
