"""The search service's domain models: queries, fusion, hits, records, ingest items and
outcomes, and what the upstreams answer. Plain data (no gRPC, no Milvus): the servicer
converts protobuf to and from these, the engine and the pipelines work on them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from services.common.content import Content
from services.common.errors import InvalidInput, ServiceError
from services.common.intake import ImageRef


class Target(str, Enum):
    IMAGE = "image"
    CAPTION = "caption"
    HYBRID = "hybrid"
    KEYWORD = "keyword"


@dataclass(frozen=True)
class Fusion:
    """How a hybrid search merges its legs: RRF (rank based) or weighted scores.

    The one place fusion defaults live; `given` reads fields where 0 means "unset" (proto3
    scalars, the client's defaults), `validate` says what a caller got wrong.
    """

    weighted: bool = False
    rrf_k: int = 60
    image_weight: float = 0.5
    caption_weight: float = 0.5

    @classmethod
    def given(cls, weighted: bool, rrf_k: int = 0, image_weight: float = 0.0, caption_weight: float = 0.0) -> Fusion:
        default = cls()
        if not (image_weight or caption_weight):
            image_weight, caption_weight = default.image_weight, default.caption_weight
        return cls(weighted, rrf_k or default.rrf_k, image_weight, caption_weight)

    def validate(self) -> None:
        if not 0 < self.rrf_k < 16384:
            raise InvalidInput(f"fusion.rrf_k must be in (0, 16384), got {self.rrf_k}")
        if self.weighted and not (0 <= self.image_weight <= 1 and 0 <= self.caption_weight <= 1):
            raise InvalidInput("fusion weights must be in [0, 1]")


@dataclass(frozen=True)
class Leg:
    """One leg of a hybrid search and its weight (WEIGHTED fusion)."""

    target: Target
    weight: float = 1.0


@dataclass(frozen=True)
class Example:
    """One example of a multi-example query: content to embed, or a stored item's id."""

    weight: float
    content: Content | None = None
    id: str = ""


@dataclass(frozen=True)
class GroupBy:
    field: str
    size: int = 1


@dataclass(frozen=True)
class Decay:
    field: str
    scale: float
    function: str = "gauss"
    origin: float = 0.0  # for ingested_at, 0 means now
    offset: float = 0.0
    decay: float = 0.5


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
    legs: tuple[Leg, ...] = ()
    like_id: str = ""
    examples: tuple[Example, ...] = ()
    min_score: float | None = None
    group_by: GroupBy | None = None
    decay: Decay | None = None
    # The model that made `vector` ("" when the caller does not say).
    vector_model: str = ""

    @property
    def embeds(self) -> bool:
        """The query needs the embedder."""
        return self.content is not None or any(e.content is not None for e in self.examples)


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


class ItemStatus(str, Enum):
    STORED = "stored"
    UNCHANGED = "unchanged"
    FAILED = "failed"
    # An earlier item of the same stream has this id; this one is not stored.
    DUPLICATE = "duplicate"
    # Stored with its image vector only: captioning failed and the server defers it
    # (SEARCH_ON_CAPTION_FAILURE=defer); `caption_pending` until a backfill captions it.
    DEFERRED = "deferred"


@dataclass(frozen=True)
class CaptionInput:
    description: str
    keywords: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class IngestItem:
    index: int
    image: ImageRef
    id: str = ""
    metadata_json: str = ""
    caption: CaptionInput | None = None
    source_uri: str = ""
    # Set when the item's bytes could not be decoded: it fails with this reason.
    decode_error: str = ""


@dataclass(frozen=True)
class Outcome:
    index: int
    id: str
    status: ItemStatus
    error: ServiceError | None = None


@dataclass
class Progress:
    received: int = 0
    stored: int = 0
    unchanged: int = 0
    failed: int = 0
    duplicate: int = 0
    deferred: int = 0

    @property
    def in_flight(self) -> int:
        return self.received - self.stored - self.unchanged - self.failed - self.duplicate - self.deferred


@dataclass(frozen=True)
class EmbedderInfo:
    model_id: str
    dimension: int
    composed_native: bool
    max_batch_items: int


@dataclass(frozen=True)
class CaptionResult:
    description: str
    keywords: list[str]
    model_id: str


class BackfillStatus(str, Enum):
    CAPTIONED = "captioned"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class BackfillOutcome:
    id: str
    status: BackfillStatus
    error: ServiceError | None = None


@dataclass
class BackfillProgress:
    total: int = 0
    captioned: int = 0
    failed: int = 0
    skipped: int = 0



@dataclass(frozen=True)
class Record:
    """One stored item as Get returns it."""

    id: str
    uri: str = ""
    caption: str = ""
    keywords: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    embedder_model_id: str = ""
    captioner_model_id: str = ""
    ingested_at_ms: int | None = None
    content_sha256: str = ""
    caption_pending: bool = False


@dataclass(frozen=True)
class CollectionStats:
    collection: str
    item_count: int
    embedder_model_id: str
    dimension: int
    captioner_model_id: str
    index_type: str
    metric_type: str
    milvus_mode: str
    caption_pending_count: int
    keyword_index: bool
    indexed_fields: dict[str, str]
