"""Search gRPC servicer: protobuf <-> domain translation only."""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from mmsearch.common.v1 import types_pb2
from mmsearch.search.v1 import search_pb2, search_pb2_grpc
from services.common.convert import content_from_proto, image_ref_from_proto
from services.common.deadline import deadline_of
from services.common.errors import InvalidInput, ServiceError
from services.common.intake import ImageRef
from services.common.interceptors import item_error
from services.search.backfill import Backfiller
from services.search.catalog import Catalog
from services.search.domain import (
    BackfillStatus,
    CaptionInput,
    CollectionStats,
    Decay,
    Example,
    Fusion,
    GroupBy,
    Hit,
    IngestItem,
    ItemStatus,
    Leg,
    Outcome,
    Progress,
    Record,
    SearchQuery,
    Target,
)
from services.search.engine import SearchEngine, metadata_json
from services.search.ingest import IngestPipeline
from services.search.ingest_wire import BrokenItem

_TARGETS = {
    search_pb2.TARGET_UNSPECIFIED: Target.IMAGE,
    search_pb2.TARGET_IMAGE: Target.IMAGE,
    search_pb2.TARGET_CAPTION: Target.CAPTION,
    search_pb2.TARGET_HYBRID: Target.HYBRID,
    search_pb2.TARGET_KEYWORD: Target.KEYWORD,
}
_TARGETS_OUT = {Target.IMAGE: search_pb2.TARGET_IMAGE, Target.CAPTION: search_pb2.TARGET_CAPTION,
                Target.HYBRID: search_pb2.TARGET_HYBRID, Target.KEYWORD: search_pb2.TARGET_KEYWORD}
_DECAY_FUNCTIONS = {search_pb2.DECAY_FUNCTION_UNSPECIFIED: "gauss", search_pb2.DECAY_FUNCTION_GAUSS: "gauss",
                    search_pb2.DECAY_FUNCTION_EXP: "exp", search_pb2.DECAY_FUNCTION_LINEAR: "linear"}
DEFAULT_EXPORT_BATCH = 256
_STATUS = {ItemStatus.STORED: search_pb2.ITEM_STATUS_STORED, ItemStatus.UNCHANGED: search_pb2.ITEM_STATUS_UNCHANGED,
           ItemStatus.FAILED: search_pb2.ITEM_STATUS_FAILED, ItemStatus.DUPLICATE: search_pb2.ITEM_STATUS_DUPLICATE,
           ItemStatus.DEFERRED: search_pb2.ITEM_STATUS_DEFERRED}
_BACKFILL_STATUS = {BackfillStatus.CAPTIONED: search_pb2.BACKFILL_STATUS_CAPTIONED,
                    BackfillStatus.FAILED: search_pb2.BACKFILL_STATUS_FAILED,
                    BackfillStatus.SKIPPED: search_pb2.BACKFILL_STATUS_SKIPPED}


def _timestamp(ms: Any) -> Timestamp | None:
    if ms is None:
        return None
    ts = Timestamp()
    ts.FromMilliseconds(int(ms))
    return ts


def _query(request: search_pb2.SearchRequest) -> SearchQuery:
    f = request.fusion
    if f.method not in (search_pb2.FUSION_METHOD_UNSPECIFIED, search_pb2.FUSION_METHOD_RRF,
                        search_pb2.FUSION_METHOD_WEIGHTED):
        raise InvalidInput(f"unknown fusion method {f.method}")
    return SearchQuery(
        content=content_from_proto(request.query) if request.HasField("query") else None,
        vector=list(request.query_vector.values) if request.HasField("query_vector") else None,
        target=_target(request.target),
        fusion=Fusion.given(f.method == search_pb2.FUSION_METHOD_WEIGHTED, f.rrf_k, f.image_weight, f.caption_weight),
        top_k=request.top_k,
        offset=request.offset,
        filter=request.filter,
        output_fields=tuple(request.output_fields),
        legs=tuple(Leg(_target(leg.target), leg.weight) for leg in request.legs),
        like_id=request.like_id,
        examples=tuple(_example(i, e) for i, e in enumerate(request.examples)),
        min_score=request.min_score if request.HasField("min_score") else None,
        group_by=GroupBy(request.group_by.field, request.group_by.size or 1) if request.HasField("group_by") else None,
        decay=_decay(request.decay) if request.HasField("decay") else None,
        vector_model=request.query_vector_model_id,
    )


def _target(value: int) -> Target:
    if value not in _TARGETS:
        raise InvalidInput(f"unknown target {value}")
    return _TARGETS[value]


def _example(index: int, e: search_pb2.Example) -> Example:
    kind = e.WhichOneof("example")
    if kind is None:
        raise InvalidInput(f"examples[{index}] needs exactly one of content and id")
    return Example(e.weight, content_from_proto(e.content) if kind == "content" else None,
                   e.id if kind == "id" else "")


def _decay(d: search_pb2.Decay) -> Decay:
    if d.function not in _DECAY_FUNCTIONS:
        raise InvalidInput(f"unknown decay function {d.function}")
    return Decay(d.field, d.scale, _DECAY_FUNCTIONS[d.function], d.origin, d.offset, d.decay or 0.5)


def _hit(hit: Hit) -> search_pb2.Hit:
    f = hit.fields
    return search_pb2.Hit(
        rank=hit.rank, id=hit.id, score=hit.score, uri=f.get("uri") or "", caption=f.get("caption") or "",
        keywords=f.get("keywords") or [], metadata_json=metadata_json(f.get("metadata")),
        embedder_model_id=f.get("embedder_model_id") or "", captioner_model_id=f.get("captioner_model_id") or "",
        ingested_at=_timestamp(f.get("ingested_at")), caption_pending=bool(f.get("caption_pending")),
    )


def _error(e: ServiceError | None) -> types_pb2.ItemError | None:
    return item_error(e) if e else None


class SearchServicer(search_pb2_grpc.SearchServicer):
    """Protobuf <-> domain, and nothing else: each RPC converts, calls the domain, converts."""

    def __init__(
        self, engine: SearchEngine, pipeline: IngestPipeline, catalog: Catalog, backfiller: Backfiller
    ) -> None:
        self.engine = engine
        self.pipeline = pipeline
        self.catalog = catalog
        self.backfiller = backfiller

    async def Backfill(
        self, request: search_pb2.BackfillRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[search_pb2.BackfillResponse]:
        async for outcomes, p in self.backfiller.run(request.max_items, request.max_items_per_s):
            yield search_pb2.BackfillResponse(
                outcomes=[search_pb2.BackfillOutcome(id=o.id, status=_BACKFILL_STATUS[o.status], error=_error(o.error))
                          for o in outcomes],
                progress=search_pb2.BackfillProgress(total=p.total, captioned=p.captioned, failed=p.failed,
                                                     skipped=p.skipped),
            )

    async def Search(self, request: search_pb2.SearchRequest, context: grpc.aio.ServicerContext) -> search_pb2.SearchResponse:
        result = await self.engine.search(_query(request), deadline_of(context))
        return search_pb2.SearchResponse(
            hits=[_hit(h) for h in result.hits],
            target=_TARGETS_OUT[result.target],
            timings=search_pb2.SearchTimings(embed_ms=result.embed_ms, milvus_ms=result.milvus_ms, total_ms=result.total_ms),
        )

    async def SearchAll(
        self, request: search_pb2.SearchAllRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[search_pb2.SearchAllResponse]:
        query = _query(request.search)
        sent = 0
        async for hits in self.engine.search_all(
            query, request.limit, request.batch_size or DEFAULT_EXPORT_BATCH, deadline_of(context)
        ):
            sent += len(hits)
            yield search_pb2.SearchAllResponse(hits=[_hit(h) for h in hits], sent=sent)

    async def Ingest(
        self, request_iterator: AsyncIterator[search_pb2.IngestRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[search_pb2.IngestResponse]:
        async def items() -> AsyncIterator[IngestItem]:
            index = 0
            # Requests may be `SalvagedIngestRequest`s holding `BrokenItem`s (ingest_wire).
            async for request in request_iterator:
                for it in request.items:
                    if isinstance(it, BrokenItem):
                        yield IngestItem(index, ImageRef(), decode_error=it.reason)
                    else:
                        yield _ingest_item(index, it)
                    index += 1

        async for outcomes, progress in self.pipeline.run(items(), deadline_of(context)):
            yield search_pb2.IngestResponse(outcomes=[_outcome(o) for o in outcomes], progress=_progress(progress))

    async def Get(self, request: search_pb2.GetRequest, context: grpc.aio.ServicerContext) -> search_pb2.GetResponse:
        records, missing = await self.catalog.get(request.ids)
        return search_pb2.GetResponse(records=[_record(r) for r in records], missing_ids=missing)

    async def Delete(self, request: search_pb2.DeleteRequest, context: grpc.aio.ServicerContext) -> search_pb2.DeleteResponse:
        return search_pb2.DeleteResponse(deleted_count=await self.catalog.delete(request.ids))

    async def Stats(self, request: search_pb2.StatsRequest, context: grpc.aio.ServicerContext) -> search_pb2.StatsResponse:
        return _stats(await self.catalog.stats())


def _record(r: Record) -> search_pb2.Record:
    return search_pb2.Record(
        id=r.id, uri=r.uri, caption=r.caption, keywords=r.keywords, metadata_json=metadata_json(r.metadata),
        embedder_model_id=r.embedder_model_id, captioner_model_id=r.captioner_model_id,
        ingested_at=_timestamp(r.ingested_at_ms), content_sha256=r.content_sha256, caption_pending=r.caption_pending,
    )


def _stats(s: CollectionStats) -> search_pb2.StatsResponse:
    return search_pb2.StatsResponse(
        collection=s.collection, item_count=s.item_count, embedder_model_id=s.embedder_model_id,
        dimension=s.dimension, captioner_model_id=s.captioner_model_id, index_type=s.index_type,
        metric_type=s.metric_type, milvus_mode=s.milvus_mode, caption_pending_count=s.caption_pending_count,
        keyword_index=s.keyword_index, indexed_fields=[f"{n}:{k}" for n, k in s.indexed_fields.items()],
    )


def _ingest_item(index: int, it: search_pb2.IngestItem) -> IngestItem:
    # An item without an image still gets an outcome: intake fails it with a clear reason.
    image = image_ref_from_proto(it.image) if it.image.WhichOneof("source") else ImageRef()
    caption = CaptionInput(it.caption.description, list(it.caption.keywords)) if it.HasField("caption") else None
    return IngestItem(index, image, it.id, it.metadata_json, caption, it.source_uri)


def _outcome(o: Outcome) -> search_pb2.ItemOutcome:
    return search_pb2.ItemOutcome(index=o.index, id=o.id, status=_STATUS[o.status], error=_error(o.error))


def _progress(p: Progress) -> search_pb2.IngestProgress:
    return search_pb2.IngestProgress(
        received=p.received, stored=p.stored, unchanged=p.unchanged, failed=p.failed, in_flight=p.in_flight,
        duplicate=p.duplicate, deferred=p.deferred,
    )
