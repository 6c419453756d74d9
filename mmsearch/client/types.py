"""Typed values the client returns and accepts, free of protobuf.

Callers get plain dataclasses (with `metadata` already parsed from JSON and
timestamps as `datetime`), so code that uses the client never touches generated
protobuf classes and does not break when a field is added to the contract.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import Enum
from typing import TYPE_CHECKING, Any, TypedDict, Union

import grpc

if TYPE_CHECKING:  # Pillow is optional for the client; only used when the caller passes an image
    from PIL.Image import Image as PILImage

#: An image to send: encoded bytes, a local file path, a URI the *server* reads
#: ("file://..." inside its file root, or "http(s)://..." when it allows remote fetching),
#: or a PIL image (encoded as PNG).
ImageInput = Union[bytes, str, "os.PathLike[str]", "PILImage"]


class Target(str, Enum):
    """Which stored vectors a query is compared with."""

    IMAGE = "image"  # text -> image, image -> image, composed
    CAPTION = "caption"  # text -> text, image -> text
    HYBRID = "hybrid"  # several legs (image + caption by default, or `legs=`), fused
    KEYWORD = "keyword"  # BM25 over each item's caption and keywords (text queries only)


class FusionMethod(str, Enum):
    RRF = "rrf"
    WEIGHTED = "weighted"


@dataclass(frozen=True)
class Fusion:
    """How hybrid results are fused (ignored unless the target is HYBRID).

    Zeros mean the server defaults (RRF k = 60; weights 0.5 / 0.5).
    """

    method: FusionMethod = FusionMethod.RRF
    rrf_k: int = 0
    image_weight: float = 0.0
    caption_weight: float = 0.0


@dataclass(frozen=True)
class ExampleId:
    """A stored item used as an example: its stored vector for the searched target."""

    id: str


@dataclass(frozen=True)
class Example:
    """One weighted example of a multi-example query: exactly one of `text`, `image`
    (optionally with `instruction`: a composed item) and `id` (a stored item).
    `weight`: finite and non-zero; negative pushes results away from it."""

    text: str | None = None
    image: ImageInput | None = None
    instruction: str | None = None
    instruction_weight: float = 0.0
    id: str | None = None
    weight: float = 1.0


#: What `examples=` takes per entry: an `Example`, an `ExampleId`, a text (str), an image
#: (bytes, a `pathlib.Path`, a PIL image), or a `(any of these, weight)` pair.
ExampleInput = Union[Example, ExampleId, str, bytes, "os.PathLike[str]", "PILImage", tuple[Any, float]]

#: What `legs=` takes: {"image": 0.5, "caption": 0.3, "keyword": 0.2}, a sequence of
#: (target, weight) pairs, or a sequence of targets (weight 1 each).
LegsInput = Mapping[Any, float] | Sequence[Any]


class DecayFunction(str, Enum):
    GAUSS = "gauss"
    EXP = "exp"
    LINEAR = "linear"


@dataclass(frozen=True)
class Decay:
    """Boosts hits by how close a numeric field is to `origin` (Milvus decay reranker):
    score x factor, the factor is 1 within `offset` of the origin and `decay` at
    `offset + scale`.

    `field`: "ingested_at" (milliseconds since the epoch) or an indexed numeric field.
    For "ingested_at", `scale` and `offset` are milliseconds and also take a
    `timedelta` or a duration string ("7d", "12h", "30m", "45s", "500ms"); origin 0
    means now.
    """

    field: str = "ingested_at"
    scale: float | timedelta | str = 0.0
    origin: float = 0.0
    offset: float | timedelta | str = 0.0
    decay: float = 0.0  # 0: the server default, 0.5
    function: DecayFunction | str = DecayFunction.GAUSS


@dataclass(frozen=True)
class SearchAllProgress:
    """After each streamed batch: hits sent so far (this batch included)."""

    sent: int
    batch: int


class SearchFeatures(TypedDict, total=False):
    """`search`'s keyword arguments beyond text / image / vector (see `SearchClient.search`)."""

    like: str | None
    examples: Sequence[ExampleInput] | None
    min_score: float | None
    legs: LegsInput | None
    group_by: str | None
    group_size: int
    decay: Decay | None
    boost_recency: float | timedelta | str | None


class StreamQuery(TypedDict, total=False):
    """`search_all`'s keyword arguments (one vector target, image or caption, in rank order:
    no keyword, legs, grouping or decay)."""

    image: ImageInput | None
    instruction: str | None
    instruction_weight: float
    vector: Sequence[float] | None
    like: str | None
    examples: Sequence[ExampleInput] | None
    target: Target | str | None
    filter: str
    output_fields: Sequence[str]
    min_score: float | None


ProgressCallback = Callable[[SearchAllProgress], None]


@dataclass(frozen=True)
class SearchTimings:
    embed_ms: float = 0.0
    milvus_ms: float = 0.0
    total_ms: float = 0.0


@dataclass(frozen=True)
class Hit:
    """One search hit. `score`: higher is better, whatever the metric."""

    rank: int
    id: str
    score: float
    uri: str = ""
    caption: str = ""
    keywords: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    embedder_model_id: str = ""
    captioner_model_id: str = ""
    ingested_at: datetime | None = None


@dataclass(frozen=True)
class SearchResult:
    hits: list[Hit]
    target: Target
    timings: SearchTimings = field(default_factory=SearchTimings)

    def __iter__(self) -> Iterator[Hit]:
        return iter(self.hits)

    def __len__(self) -> int:
        return len(self.hits)

    def __getitem__(self, i: int) -> Hit:
        return self.hits[i]


@dataclass(frozen=True)
class Record:
    """A stored item, as returned by `get`."""

    id: str
    uri: str = ""
    caption: str = ""
    keywords: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    embedder_model_id: str = ""
    captioner_model_id: str = ""
    ingested_at: datetime | None = None
    content_sha256: str = ""


@dataclass(frozen=True)
class GetResult:
    records: list[Record]
    missing_ids: list[str]


@dataclass
class IngestItem:
    """One item to ingest.

    `id` empty: the server uses the SHA-256 of the image bytes (idempotent re-runs).
    `caption` set: the server skips the captioner and embeds this text.
    `source_uri`: what to store as the item's `uri` when the image is sent inline; a
    local path given as `image` fills it with that file's `file://` URI.
    """

    image: ImageInput
    id: str = ""
    metadata: Mapping[str, Any] | None = None
    caption: str | None = None
    keywords: Sequence[str] = ()
    source_uri: str = ""


class ItemStatus(str, Enum):
    STORED = "stored"
    UNCHANGED = "unchanged"
    FAILED = "failed"
    # Not stored: an earlier item of the same call has this id (the first one wins).
    DUPLICATE = "duplicate"
    # Stored with its image vector, caption pending (the captioner failed and the server
    # defers captions); `Backfill` captions it later. `message` is the caption failure.
    DEFERRED = "deferred"


@dataclass(frozen=True)
class IngestOutcome:
    """What happened to one item. `index` is its position in the caller's iterable."""

    index: int
    id: str
    status: ItemStatus
    error_code: grpc.StatusCode | None = None
    error_message: str = ""
    # True when the client failed the item before sending it (e.g. unreadable file).
    local: bool = False

    @property
    def ok(self) -> bool:
        return self.status is not ItemStatus.FAILED


@dataclass(frozen=True)
class IngestProgress:
    """Running totals for the whole call (items that failed locally included)."""

    received: int = 0
    stored: int = 0
    unchanged: int = 0
    failed: int = 0
    in_flight: int = 0
    duplicate: int = 0
    deferred: int = 0

    @property
    def done(self) -> int:
        return self.stored + self.unchanged + self.failed + self.duplicate + self.deferred


@dataclass(frozen=True)
class IngestUpdate:
    """One step of an ingest call: new outcomes and the totals after them."""

    outcomes: tuple[IngestOutcome, ...]
    progress: IngestProgress


@dataclass
class IngestSummary:
    outcomes: list[IngestOutcome] = field(default_factory=list)
    progress: IngestProgress = field(default_factory=IngestProgress)

    @property
    def stored(self) -> int:
        return sum(1 for o in self.outcomes if o.status is ItemStatus.STORED)

    @property
    def unchanged(self) -> int:
        return sum(1 for o in self.outcomes if o.status is ItemStatus.UNCHANGED)

    @property
    def duplicates(self) -> list[IngestOutcome]:
        """Items not stored because an earlier item of the call had the same id."""
        return [o for o in self.outcomes if o.status is ItemStatus.DUPLICATE]

    @property
    def failures(self) -> list[IngestOutcome]:
        return [o for o in self.outcomes if o.status is ItemStatus.FAILED]

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def ok(self) -> bool:
        return not self.failures

    def add(self, update: IngestUpdate) -> None:
        """Takes in one update of an ingest call (outcomes in arrival order)."""
        self.outcomes.extend(update.outcomes)
        self.progress = update.progress


class BackfillStatus(str, Enum):
    CAPTIONED = "captioned"
    FAILED = "failed"  # still pending; `message` says why
    SKIPPED = "skipped"  # no longer pending when its turn came


@dataclass(frozen=True)
class BackfillOutcome:
    id: str
    status: BackfillStatus
    code: grpc.StatusCode | None = None
    message: str = ""


@dataclass(frozen=True)
class BackfillProgress:
    total: int = 0
    captioned: int = 0
    failed: int = 0
    skipped: int = 0

    @property
    def done(self) -> int:
        return self.captioned + self.failed + self.skipped


@dataclass(frozen=True)
class BackfillUpdate:
    outcomes: tuple[BackfillOutcome, ...]
    progress: BackfillProgress


@dataclass(frozen=True)
class Stats:
    collection: str
    item_count: int
    embedder_model_id: str
    dimension: int
    captioner_model_id: str
    index_type: str
    metric_type: str
    milvus_mode: str
    caption_pending_count: int = 0
    # The collection has the keyword (BM25) leg; False for collections created before it.
    keyword_index: bool = False
    # Indexed metadata fields as "name:type" (string, int, float, bool).
    indexed_fields: tuple[str, ...] = ()


class SearchError(Exception):
    """A failed call: the gRPC status code and the server's message.

    The original `grpc.RpcError` is kept as `__cause__`.
    """

    def __init__(self, code: grpc.StatusCode, details: str, method: str = "") -> None:
        self.code = code
        self.details = details
        self.method = method
        where = f"{method}: " if method else ""
        super().__init__(f"{where}{code.name}: {details}")


# ---------------------------------------------------------------------------- admin (model change)


class Role(str, Enum):
    """A physical collection's part in the logical index (mmsearch.admin.v1.Role)."""

    UNSPECIFIED = "unspecified"
    LIVE = "live"  # the alias points here: Search reads it
    CANDIDATE = "candidate"  # being built for a new model; Ingest writes it too
    PREVIOUS = "previous"  # live before the last promote; Ingest writes it too (rollback)
    RETIRED = "retired"  # neither: a version Ingest no longer writes (drop it)


@dataclass(frozen=True)
class CollectionInfo:
    """One physical collection of the index ("<index>__v<N>")."""

    name: str
    version: int
    embedder_model_id: str
    dimension: int
    item_count: int
    role: Role
    # The embedder target this server has for the model ("" when none: the collection
    # cannot be written or promoted from this server).
    embedder_target: str = ""


@dataclass(frozen=True)
class IndexCollections:
    """`AdminClient.list_collections()`: the logical index (the alias) and its collections."""

    index: str
    collections: list[CollectionInfo]

    def _with(self, role: Role) -> CollectionInfo | None:
        return next((c for c in self.collections if c.role is role), None)

    @property
    def live(self) -> CollectionInfo | None:
        return self._with(Role.LIVE)

    @property
    def candidate(self) -> CollectionInfo | None:
        return self._with(Role.CANDIDATE)

    @property
    def previous(self) -> CollectionInfo | None:
        return self._with(Role.PREVIOUS)

    def __iter__(self) -> Iterator[CollectionInfo]:
        return iter(self.collections)

    def __len__(self) -> int:
        return len(self.collections)


class IndexBackfillStatus(str, Enum):
    """What the index backfill (Admin.Backfill) did with one live item."""

    COPIED = "copied"  # written to the candidate with the candidate model's vectors
    SKIPPED = "skipped"  # already in the candidate with the same content
    FAILED = "failed"  # see `code` / `message` (e.g. the image cannot be re-read)


@dataclass(frozen=True)
class IndexBackfillOutcome:
    id: str
    status: IndexBackfillStatus
    code: grpc.StatusCode | None = None
    message: str = ""


@dataclass(frozen=True)
class IndexBackfillProgress:
    """Running totals of an index backfill; `total`: live items when the call started."""

    total: int = 0
    copied: int = 0
    skipped: int = 0
    failed: int = 0

    @property
    def done(self) -> int:
        return self.copied + self.skipped + self.failed


@dataclass(frozen=True)
class IndexBackfillUpdate:
    """One message of `AdminClient.backfill`: new outcomes and the totals after them.
    Unpacks as a pair: `for outcomes, progress in admin.backfill(): ...`."""

    outcomes: tuple[IndexBackfillOutcome, ...]
    progress: IndexBackfillProgress

    def __iter__(self) -> Iterator[Any]:
        return iter((self.outcomes, self.progress))


@dataclass
class IndexBackfillSummary:
    """`AdminClient.backfill_all()`: every outcome in arrival order and the final totals."""

    outcomes: list[IndexBackfillOutcome] = field(default_factory=list)
    progress: IndexBackfillProgress = field(default_factory=IndexBackfillProgress)

    @property
    def failures(self) -> list[IndexBackfillOutcome]:
        return [o for o in self.outcomes if o.status is IndexBackfillStatus.FAILED]

    @property
    def ok(self) -> bool:
        return not self.failures and not self.progress.failed

    def add(self, update: IndexBackfillUpdate) -> None:
        self.outcomes.extend(update.outcomes)
        self.progress = update.progress


@dataclass(frozen=True)
class SwitchResult:
    """`promote` / `rollback`: the collection the alias now points to, the one it pointed
    to before, and how many items the catch-up pass copied."""

    live: CollectionInfo
    previous: CollectionInfo
    caught_up: int = 0
