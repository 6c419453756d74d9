"""Search: validate, embed the query once, search the chosen vector field(s), page."""
from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.common.admission import AdmissionLimiter
from services.common.content import ComposedContent, Content, ImageContent, TextContent
from services.common.deadline import NO_DEADLINE, Deadline
from services.common.errors import FailedPrecondition, InvalidInput
from services.common.intake import ImageIntake, ImageRef
from services.search import fields as F
from services.search.binding import EmbedderBinding
from services.search.domain import Example, Hit, Leg, SearchQuery, SearchResult, Target
from services.search.metrics import SEARCH_SECONDS, SEARCH_STAGE_SECONDS
from services.search.ports import (
    CollectionInfo,
    DecaySpec,
    Embedder,
    Index,
    LegQuery,
    RawHit,
    SearchOptions,
    VectorStore,
)
from services.search.settings import SearchSettings
from services.search.validation import check_filter, check_id, check_vector

# The Milvus field each single target searches.
LEG_FIELDS = {Target.IMAGE: F.IMAGE_VECTOR, Target.CAPTION: F.CAPTION_VECTOR, Target.KEYWORD: F.KEYWORD_SPARSE}
DECAY_FUNCTIONS = ("gauss", "exp", "linear")
MAX_GROUP_SIZE = 16


@dataclass(frozen=True)
class _On:
    """What one call runs on: a physical collection and the embedder of its model."""

    store: VectorStore
    info: CollectionInfo
    embedder: Embedder | None


def mode_label(query: SearchQuery) -> str:
    """'text->image', 'composed->hybrid', 'like->caption', ... for metrics."""
    if query.like_id:
        kind = "like"
    elif query.examples:
        kind = "examples"
    else:
        kind = {TextContent: "text", ImageContent: "image", ComposedContent: "composed"}.get(
            type(query.content), "vector")
    return f"{kind}->{query.target.value}"


def _finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise InvalidInput(f"{what} must be a finite number, got {value}")
    return value


class SearchEngine:
    """Each call runs on one physical collection (the index's live one when the call
    starts) and embeds its query with the embedder of that collection's model, so a search
    never mixes models, even while a promote swaps the index. Queries that need an
    embedder fail at once, before taking an admission slot, when it cannot serve;
    query_vector, like_id and stored-id searches need only the store.
    """

    def __init__(
        self, settings: SearchSettings, index: Index, intake: ImageIntake, binding: EmbedderBinding,
    ) -> None:
        self.settings = settings
        self.index = index
        self.intake = intake
        self.binding = binding
        self.limiter = AdmissionLimiter(settings.max_concurrent_searches, settings.max_waiting_searches, "searches")
        self.exports = AdmissionLimiter(settings.max_concurrent_exports, 0, "SearchAll streams")

    # --- validation (no I/O) -------------------------------------------------------------

    def _validate_page(self, q: SearchQuery) -> None:
        s = self.settings
        if not 1 <= q.top_k <= s.max_top_k:
            raise InvalidInput(f"top_k must be between 1 and {s.max_top_k}, got {q.top_k}")
        if q.offset < 0:
            raise InvalidInput(f"offset must be >= 0, got {q.offset}")
        if q.offset + q.top_k > s.max_window:
            raise InvalidInput(f"offset + top_k must be at most {s.max_window}, got {q.offset + q.top_k}")
        if q.group_by is not None and q.offset > 0:
            raise InvalidInput("group_by cannot be combined with offset > 0 (groups are formed over the first page)")

    def _validate(self, q: SearchQuery) -> tuple[list[str], str]:
        s = self.settings
        given = [q.content is not None, q.vector is not None, bool(q.like_id), bool(q.examples)]
        if sum(given) != 1:
            raise InvalidInput("set exactly one of query, query_vector, like_id and examples")
        self._check_content(q.content, "query")
        if q.like_id:
            check_id(q.like_id)
        self._validate_examples(q.examples)
        unknown = [f for f in q.output_fields if f not in F.OUTPUT_FIELDS]
        if unknown:
            raise InvalidInput(f"unknown output fields {unknown}; known: {sorted(F.OUTPUT_FIELDS)}")
        names = list(q.output_fields) or list(F.OUTPUT_FIELDS)
        if q.target is Target.HYBRID:
            self._validate_fusion(q)
        elif q.legs:
            raise InvalidInput("legs apply to the HYBRID target only")
        legs = self._legs(q)
        if any(leg.target is Target.KEYWORD for leg in legs) and not (
                isinstance(q.content, TextContent) or q.like_id):
            raise InvalidInput("the keyword leg takes a text query (or like_id): images, vectors and examples "
                               "cannot be matched by words")
        if q.min_score is not None:
            _finite(q.min_score, "min_score")
        if q.group_by is not None and not 1 <= q.group_by.size <= MAX_GROUP_SIZE:
            raise InvalidInput(f"group_by.size must be between 1 and {MAX_GROUP_SIZE}, got {q.group_by.size}")
        if q.decay is not None:
            self._validate_decay(q)
        return names, check_filter(q.filter, s.max_filter_chars)

    @staticmethod
    def _check_content(content: Content | None, what: str) -> None:
        if isinstance(content, TextContent) and not content.text.strip():
            raise InvalidInput(f"{what} text is empty")
        if isinstance(content, ComposedContent) and not content.instruction.strip():
            raise InvalidInput(f"{what}: composed query has an empty instruction")

    def _validate_examples(self, examples: tuple[Example, ...]) -> None:
        if not examples:
            return
        if len(examples) > self.settings.max_examples:
            raise InvalidInput(f"{len(examples)} examples, more than the limit of {self.settings.max_examples}")
        for i, e in enumerate(examples):
            _finite(e.weight, f"examples[{i}].weight")
            if e.weight == 0:
                raise InvalidInput(f"examples[{i}].weight is 0: give each example a positive or negative weight")
            if (e.content is None) == (not e.id):
                raise InvalidInput(f"examples[{i}] needs exactly one of content and id")
            if e.id:
                check_id(e.id)
            self._check_content(e.content, f"examples[{i}]")
        if not any(e.weight > 0 for e in examples):
            raise InvalidInput("examples need at least one positive weight (negatives only push results away)")

    @staticmethod
    def _validate_fusion(q: SearchQuery) -> None:
        fuse = q.fusion
        fuse.validate()
        seen = set()
        for leg in q.legs:
            if leg.target not in LEG_FIELDS:
                raise InvalidInput(f"a hybrid leg must be IMAGE, CAPTION or KEYWORD, got {leg.target.value}")
            if leg.target in seen:
                raise InvalidInput(f"leg {leg.target.value} is given twice")
            seen.add(leg.target)
            if _finite(leg.weight, f"{leg.target.value} leg weight") < 0:
                raise InvalidInput(f"{leg.target.value} leg weight must be >= 0, got {leg.weight}")
        if q.legs and fuse.weighted and not any(leg.weight > 0 for leg in q.legs):
            raise InvalidInput("weighted fusion needs at least one leg with a weight > 0")
        if q.decay is not None:
            raise InvalidInput("decay cannot be combined with the HYBRID target")

    @staticmethod
    def _validate_decay(q: SearchQuery) -> None:
        d = q.decay
        assert d is not None
        if not d.field:
            raise InvalidInput("decay.field is empty: use 'ingested_at' or an indexed numeric field")
        if d.function not in DECAY_FUNCTIONS:
            raise InvalidInput(f"unknown decay function {d.function!r}; use one of {DECAY_FUNCTIONS}")
        if not _finite(d.scale, "decay.scale") > 0:
            raise InvalidInput(f"decay.scale must be > 0, got {d.scale}")
        if _finite(d.offset, "decay.offset") < 0:
            raise InvalidInput(f"decay.offset must be >= 0, got {d.offset}")
        if not 0 < _finite(d.decay, "decay.decay") < 1:
            raise InvalidInput(f"decay.decay must be in (0, 1), got {d.decay}")
        _finite(d.origin, "decay.origin")

    @staticmethod
    def _legs(q: SearchQuery) -> list[Leg]:
        if q.target is not Target.HYBRID:
            return [Leg(q.target)]
        if q.legs:
            return list(q.legs)
        weights = (q.fusion.image_weight, q.fusion.caption_weight)
        return [Leg(Target.IMAGE, weights[0]), Leg(Target.CAPTION, weights[1])]

    # --- resolution against the collection ------------------------------------------------

    async def _on(self, q: SearchQuery) -> _On:
        """The collection this call runs on, and the embedder of its model when it embeds."""
        store = await self.index.live()
        info = await store.require()
        if q.vector is not None and q.vector_model and q.vector_model != info.model_id:
            raise FailedPrecondition(f"query_vector was made by {q.vector_model!r}, but the collection "
                                     f"{store.collection!r} was built by {info.model_id!r}")
        embedder = await self.binding.embedder_for(info.model_id) if q.embeds else None
        return _On(store, info, embedder)

    async def _options(self, q: SearchQuery, names: list[str], expr: str, on: _On) -> SearchOptions:
        info = on.info
        group_by = None
        if q.group_by is not None:
            if q.group_by.field not in info.indexed_fields:
                raise InvalidInput(f"group_by.field {q.group_by.field!r} is not an indexed field of this "
                                   f"collection (indexed: {sorted(info.indexed_fields) or 'none'})")
            group_by = (q.group_by.field, q.group_by.size)
        decay = None
        if q.decay is not None:
            d = q.decay
            numeric = [n for n, kind in info.indexed_fields.items() if kind in ("int", "float")]
            if d.field == "ingested_at":
                column, origin = "ingested_at_ms", d.origin or time.time() * 1000
            elif d.field in numeric:
                column, origin = d.field, d.origin
            else:
                raise InvalidInput(f"decay.field {d.field!r} must be 'ingested_at' or an indexed numeric field "
                                   f"(indexed numeric: {numeric or 'none'})")
            decay = DecaySpec(d.function, column, origin, d.scale, d.offset, d.decay)
        if q.like_id:  # the item itself is never a hit
            own = f'id != "{on.store.stored_key(q.like_id)}"'  # check_id allows no quotes or backslashes
            expr = f"({expr}) and {own}" if expr else own
        fields = [F.OUTPUT_FIELDS[n] for n in names if n != F.CAPTION_PENDING or on.store.pending_supported]
        return SearchOptions(expr, fields, q.min_score, group_by, decay)

    async def _leg_queries(self, q: SearchQuery, deadline: Deadline, on: _On) -> list[LegQuery]:
        """Each leg's query data: a vector for dense legs, text for the keyword leg."""
        info = on.info
        legs = self._legs(q)
        if any(leg.target is Target.KEYWORD for leg in legs) and not info.has_keyword:
            raise FailedPrecondition(
                f"collection {on.store.collection!r} was created before the keyword leg existed and has no "
                f"keyword index. To migrate without downtime: `mmsearch index create --model {info.model_id}` (a new "
                "version, with the keyword field), `mmsearch index backfill`, `mmsearch index promote` "
                "(docs/operations.md, \"Change the embedding model\")."
            )
        if q.vector is not None:
            vector = check_vector(q.vector, info.dimension)
            return [LegQuery(LEG_FIELDS[leg.target], vector, leg.weight) for leg in legs]
        if q.content is not None:
            dense = any(leg.target is not Target.KEYWORD for leg in legs)
            vector = (await self._embed([q.content], deadline, on))[0] if dense else np.zeros(0, np.float32)
            text = q.content.text if isinstance(q.content, TextContent) else ""
            return [LegQuery(LEG_FIELDS[leg.target], text if leg.target is Target.KEYWORD else vector, leg.weight)
                    for leg in legs]
        if q.like_id:
            stored = (await on.store.stored_vectors([q.like_id])).get(q.like_id)
            if stored is None:
                raise InvalidInput(f"like_id {q.like_id!r} is not stored")
            return [LegQuery(LEG_FIELDS[leg.target], self._stored_leg_data(q.like_id, stored, leg.target), leg.weight)
                    for leg in legs]
        return await self._example_legs(q, legs, deadline, on)

    @staticmethod
    def _stored_leg_data(item_id: str, stored: dict[str, Any], target: Target) -> np.ndarray | str:
        if target is not Target.IMAGE and stored.get(F.CAPTION_PENDING):
            raise InvalidInput(f"item {item_id!r} has no caption yet (caption pending): search its image instead")
        if target is Target.KEYWORD:
            text = str(stored.get(F.KEYWORD_TEXT) or "").strip()
            if not text:
                raise InvalidInput(f"item {item_id!r} has no caption or keywords for the keyword leg")
            return text
        return np.asarray(stored[F.IMAGE_VECTOR if target is Target.IMAGE else F.CAPTION_VECTOR], dtype=np.float32)

    async def _example_legs(self, q: SearchQuery, legs: list[Leg], deadline: Deadline, on: _On) -> list[LegQuery]:
        """The L2-normalised weighted sum of the examples' vectors, per dense leg."""
        contents = [e.content for e in q.examples if e.content is not None]
        embedded = iter(await self._embed(contents, deadline, on)) if contents else iter(())
        ids = [e.id for e in q.examples if e.id]
        stored = await on.store.stored_vectors(ids) if ids else {}
        missing = [i for i in ids if i not in stored]
        if missing:
            raise InvalidInput(f"example ids not stored: {missing[:5]}")
        per_example = [next(embedded) if e.content is not None else None for e in q.examples]
        out = []
        for leg in legs:
            total = sum(
                e.weight * (vec if vec is not None else self._stored_leg_data(e.id, stored[e.id], leg.target))
                for e, vec in zip(q.examples, per_example, strict=True)
            )
            norm = float(np.linalg.norm(total))
            if not math.isfinite(norm) or norm < 1e-6:
                raise InvalidInput("the weighted examples cancel out (their sum is a zero vector)")
            out.append(LegQuery(LEG_FIELDS[leg.target], np.asarray(total / norm, dtype=np.float32), leg.weight))
        return out

    async def _embed(self, contents: list[Content], deadline: Deadline, on: _On) -> np.ndarray:
        """Embeds query contents in one call, checking the model that built the collection."""
        fetched: list[Content] = []
        for content in contents:
            # Fetch URIs here (under our file-root / SSRF rules) and send bytes upstream.
            if isinstance(content, ImageContent | ComposedContent) and content.image.uri:
                data = await self.intake.read(content.image)
                content = (
                    ImageContent(ImageRef(data=data)) if isinstance(content, ImageContent)
                    else ComposedContent(ImageRef(data=data), content.instruction, content.instruction_weight)
                )
            fetched.append(content)
        # The caller's deadline goes downstream (gRPC does not propagate it by itself).
        deadline.check("the query was embedded")
        assert on.embedder is not None  # `_on` found it: the query embeds
        vectors, model = await on.embedder.embed(fetched, deadline)
        self.binding.check_vectors(model, on.info.model_id)
        return vectors

    # --- the calls -------------------------------------------------------------------------

    async def search(self, q: SearchQuery, deadline: Deadline = NO_DEADLINE) -> SearchResult:
        # total_ms covers the whole call (validation, the wait for admission, hit building),
        # so total - embed - milvus is the service's own share (bench/search_overhead.py).
        entered = time.perf_counter()
        self._validate_page(q)
        names, expr = self._validate(q)
        on = await self._on(q)  # fails fast without an embedder, holding no admission slot
        async with self.limiter.admit():
            start = time.perf_counter()
            opts = await self._options(q, names, expr, on)
            legs = await self._leg_queries(q, deadline, on)
            embedded = time.perf_counter()
            if q.target is Target.HYBRID:
                raw = await on.store.hybrid_search(legs, q.top_k, q.offset, opts, q.fusion.rrf_k, q.fusion.weighted)
            else:
                raw = await on.store.search(legs[0], q.top_k, q.offset, opts)
            done = time.perf_counter()
        mode = mode_label(q)
        SEARCH_SECONDS.labels(mode).observe(done - start)
        SEARCH_STAGE_SECONDS.labels(mode, "embed").observe(embedded - start)
        SEARCH_STAGE_SECONDS.labels(mode, "milvus").observe(done - embedded)
        hits = [self._hit(q.offset + i + 1, h, names) for i, h in enumerate(raw[: q.top_k])]
        total_ms = (time.perf_counter() - entered) * 1000
        return SearchResult(hits, q.target, (embedded - start) * 1000, (done - embedded) * 1000, total_ms)

    async def search_all(
        self, q: SearchQuery, limit: int, batch_size: int, deadline: Deadline = NO_DEADLINE
    ) -> AsyncIterator[list[Hit]]:
        """Every hit in rank order, in batches (Milvus' search iterator), past the window."""
        if q.target is Target.HYBRID or q.group_by is not None or q.decay is not None:
            raise InvalidInput("SearchAll streams one target (IMAGE, CAPTION or KEYWORD) without group_by or "
                               "decay: those need the whole ranking at once")
        if limit < 0:
            raise InvalidInput(f"limit must be >= 0, got {limit}")
        if not 1 <= batch_size <= MAX_EXPORT_BATCH:
            raise InvalidInput(f"batch_size must be between 1 and {MAX_EXPORT_BATCH}, got {batch_size}")
        names, expr = self._validate(q)
        on = await self._on(q)
        async with self.exports.admit():
            async with self.limiter.admit():
                opts = await self._options(q, names, expr, on)
                legs = await self._leg_queries(q, deadline, on)
            rank = 0
            async for batch in on.store.iterate(legs[0], opts, batch_size, limit):
                hits = [self._hit(rank + i + 1, h, names) for i, h in enumerate(batch)]
                rank += len(hits)
                yield hits

    @staticmethod
    def _hit(rank: int, raw: RawHit, names: list[str]) -> Hit:
        return Hit(rank, raw.id, raw.score, {n: raw.entity.get(F.OUTPUT_FIELDS[n]) for n in names})


MAX_EXPORT_BATCH = 1000


def metadata_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True) if value else ""
