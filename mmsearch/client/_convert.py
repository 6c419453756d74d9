"""Protobuf <-> client types, and the ingest bookkeeping shared by the sync and async clients."""
from __future__ import annotations

import io
import json
import math
import os
import re
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from mmsearch.admin.v1 import admin_pb2
from mmsearch.client.types import (
    BackfillOutcome,
    BackfillProgress,
    BackfillStatus,
    BackfillUpdate,
    CollectionInfo,
    Decay,
    DecayFunction,
    Example,
    ExampleId,
    ExampleInput,
    Fusion,
    FusionMethod,
    GetResult,
    Hit,
    ImageInput,
    IndexBackfillOutcome,
    IndexBackfillProgress,
    IndexBackfillStatus,
    IndexBackfillUpdate,
    IndexCollections,
    IngestItem,
    IngestOutcome,
    IngestProgress,
    IngestUpdate,
    ItemStatus,
    LegsInput,
    ProgressCallback,
    Record,
    Role,
    SearchAllProgress,
    SearchError,
    SearchResult,
    SearchTimings,
    Stats,
    SwitchResult,
    Target,
)
from mmsearch.common.v1 import types_pb2
from mmsearch.search.v1 import search_pb2

_TARGETS = {
    Target.IMAGE: search_pb2.TARGET_IMAGE,
    Target.CAPTION: search_pb2.TARGET_CAPTION,
    Target.HYBRID: search_pb2.TARGET_HYBRID,
    Target.KEYWORD: search_pb2.TARGET_KEYWORD,
}
_DECAYS = {
    DecayFunction.GAUSS: search_pb2.DECAY_FUNCTION_GAUSS,
    DecayFunction.EXP: search_pb2.DECAY_FUNCTION_EXP,
    DecayFunction.LINEAR: search_pb2.DECAY_FUNCTION_LINEAR,
}
_TARGETS_BACK = {v: k for k, v in _TARGETS.items()}
_FUSIONS = {FusionMethod.RRF: search_pb2.FUSION_METHOD_RRF, FusionMethod.WEIGHTED: search_pb2.FUSION_METHOD_WEIGHTED}
_STATUSES = {
    search_pb2.ITEM_STATUS_STORED: ItemStatus.STORED,
    search_pb2.ITEM_STATUS_UNCHANGED: ItemStatus.UNCHANGED,
    search_pb2.ITEM_STATUS_FAILED: ItemStatus.FAILED,
    search_pb2.ITEM_STATUS_DUPLICATE: ItemStatus.DUPLICATE,
    search_pb2.ITEM_STATUS_DEFERRED: ItemStatus.DEFERRED,
}
_BACKFILL_STATUSES = {
    search_pb2.BACKFILL_STATUS_CAPTIONED: BackfillStatus.CAPTIONED,
    search_pb2.BACKFILL_STATUS_FAILED: BackfillStatus.FAILED,
    search_pb2.BACKFILL_STATUS_SKIPPED: BackfillStatus.SKIPPED,
}
_CODES = {c.value[0]: c for c in grpc.StatusCode}
_ROLES = {
    admin_pb2.ROLE_LIVE: Role.LIVE,
    admin_pb2.ROLE_CANDIDATE: Role.CANDIDATE,
    admin_pb2.ROLE_PREVIOUS: Role.PREVIOUS,
    admin_pb2.ROLE_RETIRED: Role.RETIRED,
}
_INDEX_BACKFILL_STATUSES = {
    admin_pb2.BACKFILL_STATUS_COPIED: IndexBackfillStatus.COPIED,
    admin_pb2.BACKFILL_STATUS_SKIPPED: IndexBackfillStatus.SKIPPED,
    admin_pb2.BACKFILL_STATUS_FAILED: IndexBackfillStatus.FAILED,
}

_URI_SCHEMES = ("file://", "http://", "https://")


# ---------------------------------------------------------------------------- images


def _is_pil_image(value: object) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow absent: nothing can be a PIL image
        return False
    return isinstance(value, Image.Image)


def image_to_proto(image: ImageInput) -> tuple[types_pb2.Image, str]:
    """Returns the protobuf image and the `file://` URI of a local path (else "").

    Local paths are read here and sent inline: the server's file root rarely contains
    the caller's files. Strings with a scheme are URIs the server resolves itself.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        return types_pb2.Image(data=bytes(image)), ""
    if isinstance(image, str) and image.startswith(_URI_SCHEMES):
        return types_pb2.Image(uri=image), ""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image).expanduser()
        return types_pb2.Image(data=path.read_bytes()), path.resolve().as_uri()
    if _is_pil_image(image):
        buf = io.BytesIO()
        img = image if image.mode in ("RGB", "RGBA", "L", "LA", "P", "1", "I;16") else image.convert("RGB")
        img.save(buf, format="PNG")
        return types_pb2.Image(data=buf.getvalue()), ""
    raise TypeError(f"unsupported image type {type(image).__name__}: give bytes, a path, a URI or a PIL image")


# ---------------------------------------------------------------------------- search


def coerce_target(target: Target | str) -> Target:
    if isinstance(target, Target):
        return target
    try:
        return Target(str(target).lower())
    except ValueError:
        raise ValueError(f"unknown target {target!r}: one of image, caption, hybrid, keyword") from None


def coerce_fusion(fusion: Fusion | FusionMethod | str | None) -> Fusion | None:
    if fusion is None or isinstance(fusion, Fusion):
        return fusion
    if isinstance(fusion, FusionMethod):
        return Fusion(method=fusion)
    try:
        return Fusion(method=FusionMethod(str(fusion).lower()))
    except ValueError:
        raise ValueError(f"unknown fusion {fusion!r}: one of rrf, weighted") from None


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$", re.IGNORECASE)
_DURATION_MS = {"ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3, "d": 86400e3, "w": 7 * 86400e3}


def duration_ms(value: float | timedelta | str) -> float:
    """Milliseconds from a number (ms), a `timedelta` or a string: "7d", "12h", "30m", "45s",
    "500ms", "1.5w" or a bare number of milliseconds."""
    if isinstance(value, timedelta):
        return value.total_seconds() * 1000.0
    if isinstance(value, str):
        m = _DURATION.match(value)
        if not m:
            raise ValueError(f"bad duration {value!r}: a number of milliseconds or e.g. 7d, 12h, 30m, 45s, 500ms")
        return float(m.group(1)) * _DURATION_MS[(m.group(2) or "ms").lower()]
    return float(value)


def _finite(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def legs_to_proto(legs: LegsInput) -> tuple[list[search_pb2.Leg], bool]:
    """The hybrid legs and whether any weight was given (then fusion defaults to WEIGHTED).

    `{"image": 0.5, "keyword": 0.2}`, `[("image", 0.5), ("caption", 0.3)]` or `["image", "keyword"]`.
    """
    pairs: list[tuple[Any, float | None]] = []
    if isinstance(legs, Mapping):
        pairs = [(t, w) for t, w in legs.items()]
    elif isinstance(legs, str):
        raise TypeError("legs= takes a mapping {target: weight} or a sequence, not a string")
    else:
        for leg in legs:
            pairs.append((leg[0], leg[1]) if isinstance(leg, tuple) else (leg, None))
    if not pairs:
        raise ValueError("legs= is empty: name at least one of image, caption, keyword")
    out, seen, weighted = [], set(), False
    for raw, weight in pairs:
        target = coerce_target(raw)
        if target is Target.HYBRID:
            raise ValueError("a leg is image, caption or keyword, not hybrid")
        if target in seen:
            raise ValueError(f"leg {target.value} given twice")
        seen.add(target)
        if weight is not None:
            weighted = True
            if _finite(f"leg {target.value} weight", weight) < 0:
                raise ValueError(f"leg {target.value} weight must be >= 0, got {weight}")
        out.append(search_pb2.Leg(target=_TARGETS[target], weight=1.0 if weight is None else float(weight)))
    if weighted and not any(leg.weight > 0 for leg in out):
        raise ValueError("at least one leg weight must be > 0")
    return out, weighted


def content_to_proto(
    msg: types_pb2.Content, text: str | None, image: ImageInput | None, instruction: str | None,
    instruction_weight: float,
) -> None:
    """Fills a query `Content`: a text, an image, or an image + instruction (composed)."""
    if text is not None:
        msg.text = text
        return
    assert image is not None
    img, _ = image_to_proto(image)
    if instruction is not None:
        msg.composed.image.CopyFrom(img)
        msg.composed.instruction = instruction
        msg.composed.instruction_weight = instruction_weight
    else:
        msg.image.CopyFrom(img)


def example_to_proto(example: ExampleInput) -> search_pb2.Example:
    """One example: an `Example`, an `ExampleId`, a text, an image, or `(any of these, weight)`."""
    weight = 1.0
    if isinstance(example, tuple):
        if len(example) != 2:
            raise ValueError("an example pair is (example, weight)")
        example, weight = example[0], example[1]
        if isinstance(example, Example):
            example = Example(example.text, example.image, example.instruction, example.instruction_weight,
                              example.id, weight)
    if isinstance(example, ExampleId):
        example = Example(id=example.id, weight=weight)
    elif isinstance(example, str):
        example = Example(text=example, weight=weight)
    elif not isinstance(example, Example):
        example = Example(image=example, weight=weight)
    if sum(x is not None for x in (example.text, example.image, example.id)) != 1:
        raise ValueError("an Example is exactly one of text=, image= (optionally with instruction=) or id=")
    if _finite("example weight", example.weight) == 0:
        raise ValueError("an example weight must be non-zero (negative pushes results away)")
    msg = search_pb2.Example(weight=example.weight)
    if example.id is not None:
        msg.id = example.id
    else:
        content_to_proto(msg.content, example.text, example.image, example.instruction, example.instruction_weight)
    return msg


def decay_to_proto(decay: Decay) -> search_pb2.Decay:
    try:
        function = DecayFunction(decay.function.lower() if isinstance(decay.function, str) else decay.function)
    except ValueError:
        raise ValueError(f"unknown decay function {decay.function!r}: one of gauss, exp, linear") from None
    scale, offset = duration_ms(decay.scale), duration_ms(decay.offset)
    if not (_finite("decay scale", scale) > 0):
        raise ValueError(f"decay scale must be > 0, got {decay.scale!r}")
    if _finite("decay offset", offset) < 0:
        raise ValueError(f"decay offset must be >= 0, got {decay.offset!r}")
    if decay.decay and not 0 < _finite("decay", decay.decay) < 1:
        raise ValueError(f"decay (the factor at scale) must be in (0, 1), got {decay.decay}")
    return search_pb2.Decay(function=_DECAYS[function], field=decay.field, origin=_finite("decay origin", decay.origin),
                            scale=scale, offset=offset, decay=decay.decay)


def build_search_request(
    text: str | None = None,
    *,
    image: ImageInput | None = None,
    instruction: str | None = None,
    instruction_weight: float = 0.0,
    vector: Sequence[float] | None = None,
    like: str | None = None,
    examples: Sequence[ExampleInput] | None = None,
    target: Target | str | None = None,
    legs: LegsInput | None = None,
    fusion: Fusion | FusionMethod | str | None = None,
    top_k: int = 10,
    offset: int = 0,
    filter: str = "",
    output_fields: Sequence[str] = (),
    min_score: float | None = None,
    group_by: str | None = None,
    group_size: int = 0,
    decay: Decay | None = None,
    boost_recency: float | timedelta | str | None = None,
) -> search_pb2.SearchRequest:
    """One request from keyword arguments. The query: text, image, image + instruction,
    a vector, a stored id (`like`) or weighted `examples`. `target` None: HYBRID when
    `legs` are given, else IMAGE."""
    given = sum(x is not None for x in (text, image, vector, like, examples))
    if given != 1:
        raise ValueError("give exactly one query: text=, image= (optionally with instruction=), vector=, like= "
                         "(a stored id) or examples=")
    if instruction is not None and image is None:
        raise ValueError("instruction= needs image= (a composed query)")
    resolved = coerce_target(target) if target is not None else (Target.HYBRID if legs else Target.IMAGE)
    if legs and resolved is not Target.HYBRID:
        raise ValueError(f"legs= is for target hybrid, not {resolved.value}")
    if decay is not None and boost_recency is not None:
        raise ValueError("give decay= or boost_recency=, not both")
    if group_size and not group_by:
        raise ValueError("group_size= needs group_by= (the field to group by)")
    if group_by and not 0 <= group_size <= 16:
        raise ValueError(f"group_size must be 1 to 16, got {group_size}")
    request = search_pb2.SearchRequest(
        target=_TARGETS[resolved],
        top_k=top_k,
        offset=offset,
        filter=filter or "",
        output_fields=list(output_fields),
    )
    if vector is not None:
        request.query_vector.values.extend(float(v) for v in vector)
    elif like is not None:
        if not like:
            raise ValueError("like= is a stored item's id, not empty")
        request.like_id = like
    elif examples is not None:
        if isinstance(examples, (str, bytes)) or not examples:
            raise ValueError("examples= is a non-empty sequence of examples")
        request.examples.extend(example_to_proto(e) for e in examples)
        if not any(e.weight > 0 for e in request.examples):
            raise ValueError("examples= needs at least one positive weight")
    else:
        content_to_proto(request.query, text, image, instruction, instruction_weight)
    fused = coerce_fusion(fusion)
    if legs:
        leg_msgs, weighted = legs_to_proto(legs)
        request.legs.extend(leg_msgs)
        if fused is None and weighted:
            fused = Fusion(method=FusionMethod.WEIGHTED)
    if fused is not None:
        request.fusion.method = _FUSIONS[fused.method]
        request.fusion.rrf_k = fused.rrf_k
        request.fusion.image_weight = fused.image_weight
        request.fusion.caption_weight = fused.caption_weight
    if min_score is not None:
        request.min_score = _finite("min_score", min_score)
    if group_by:
        request.group_by.field = group_by
        request.group_by.size = group_size
    if boost_recency is not None:
        decay = Decay(field="ingested_at", scale=boost_recency)
    if decay is not None:
        request.decay.CopyFrom(decay_to_proto(decay))
    return request


def build_search_all_request(
    text: str | None = None, *, limit: int = 0, batch_size: int = 0, **query: Any
) -> search_pb2.SearchAllRequest:
    """A streaming search: the query of `build_search_request` (one target), a limit and a batch size."""
    if limit < 0:
        raise ValueError(f"limit must be >= 0 (0: every match), got {limit}")
    if not 0 <= batch_size <= 1000:
        raise ValueError(f"batch_size must be 1 to 1000 (0: the server default, 256), got {batch_size}")
    search = build_search_request(text, **query)
    search.ClearField("top_k")
    return search_pb2.SearchAllRequest(search=search, limit=limit, batch_size=batch_size)


def search_all_hits(msg: search_pb2.SearchAllResponse, on_progress: ProgressCallback | None) -> list[Hit]:
    """One streamed batch as hits; reports the running count first."""
    if on_progress is not None:
        on_progress(SearchAllProgress(sent=int(msg.sent), batch=len(msg.hits)))
    return [hit_from_proto(h) for h in msg.hits]


def rpc_error(e: grpc.RpcError, method: str) -> SearchError:
    """The client's error for a failed call (raise it `from e`)."""
    return SearchError(e.code(), e.details() or "", method)  # type: ignore[attr-defined]


def id_list(ids: Sequence[str] | str) -> list[str]:
    return [ids] if isinstance(ids, str) else list(ids)


def health_status_name(response: health_pb2.HealthCheckResponse) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def health_error_status(e: grpc.RpcError) -> str:
    """A failed health check: "SERVICE_UNKNOWN" for a name the server does not know,
    otherwise the call's error is raised."""
    if e.code() is grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
        return "SERVICE_UNKNOWN"
    raise rpc_error(e, "Health.Check") from e


def _metadata(raw: str) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {"_raw": raw}
    return value if isinstance(value, dict) else {"_value": value}


def _timestamp(msg: Any, has: bool) -> datetime | None:
    if not has:
        return None
    return msg.ToDatetime(tzinfo=UTC)


def _stored_fields(msg: search_pb2.Hit | search_pb2.Record) -> dict[str, Any]:
    """The fields a hit and a record share: what is stored for an item."""
    return {
        "id": msg.id,
        "uri": msg.uri,
        "caption": msg.caption,
        "keywords": tuple(msg.keywords),
        "metadata": _metadata(msg.metadata_json),
        "embedder_model_id": msg.embedder_model_id,
        "captioner_model_id": msg.captioner_model_id,
        "ingested_at": _timestamp(msg.ingested_at, msg.HasField("ingested_at")),
    }


def hit_from_proto(msg: search_pb2.Hit) -> Hit:
    return Hit(rank=msg.rank, score=msg.score, **_stored_fields(msg))


def search_result_from_proto(msg: search_pb2.SearchResponse) -> SearchResult:
    return SearchResult(
        hits=[hit_from_proto(h) for h in msg.hits],
        target=_TARGETS_BACK.get(msg.target, Target.IMAGE),
        timings=SearchTimings(msg.timings.embed_ms, msg.timings.milvus_ms, msg.timings.total_ms),
    )


def record_from_proto(msg: search_pb2.Record) -> Record:
    return Record(content_sha256=msg.content_sha256, **_stored_fields(msg))


def get_result_from_proto(msg: search_pb2.GetResponse) -> GetResult:
    return GetResult(records=[record_from_proto(r) for r in msg.records], missing_ids=list(msg.missing_ids))


def backfill_update_from_proto(msg: search_pb2.BackfillResponse) -> BackfillUpdate:
    outcomes = tuple(
        BackfillOutcome(o.id, _BACKFILL_STATUSES.get(o.status, BackfillStatus.FAILED),
                        _CODES.get(o.error.code, grpc.StatusCode.UNKNOWN) if o.HasField("error") else None,
                        o.error.message)
        for o in msg.outcomes
    )
    p = msg.progress
    return BackfillUpdate(outcomes, BackfillProgress(p.total, p.captioned, p.failed, p.skipped))


def stats_from_proto(msg: search_pb2.StatsResponse) -> Stats:
    return Stats(
        collection=msg.collection,
        item_count=msg.item_count,
        embedder_model_id=msg.embedder_model_id,
        dimension=msg.dimension,
        captioner_model_id=msg.captioner_model_id,
        index_type=msg.index_type,
        metric_type=msg.metric_type,
        milvus_mode=msg.milvus_mode,
        caption_pending_count=msg.caption_pending_count,
        keyword_index=msg.keyword_index,
        indexed_fields=tuple(msg.indexed_fields),
    )


# ---------------------------------------------------------------------------- admin


def collection_info_from_proto(msg: admin_pb2.CollectionInfo) -> CollectionInfo:
    return CollectionInfo(
        name=msg.name,
        version=msg.version,
        embedder_model_id=msg.embedder_model_id,
        dimension=msg.dimension,
        item_count=msg.item_count,
        role=_ROLES.get(msg.role, Role.UNSPECIFIED),
        embedder_target=msg.embedder_target,
    )


def index_collections_from_proto(msg: admin_pb2.ListCollectionsResponse) -> IndexCollections:
    return IndexCollections(index=msg.index, collections=[collection_info_from_proto(c) for c in msg.collections])


def index_backfill_update_from_proto(msg: admin_pb2.BackfillResponse) -> IndexBackfillUpdate:
    outcomes = tuple(
        IndexBackfillOutcome(o.id, _INDEX_BACKFILL_STATUSES.get(o.status, IndexBackfillStatus.FAILED),
                             _CODES.get(o.error.code, grpc.StatusCode.UNKNOWN) if o.HasField("error") else None,
                             o.error.message)
        for o in msg.outcomes
    )
    p = msg.progress
    return IndexBackfillUpdate(outcomes, IndexBackfillProgress(p.total, p.copied, p.skipped, p.failed))


def switch_result_from_proto(msg: admin_pb2.SwitchResponse) -> SwitchResult:
    return SwitchResult(collection_info_from_proto(msg.live), collection_info_from_proto(msg.previous),
                        int(msg.caught_up))


# ---------------------------------------------------------------------------- ingest


def item_to_proto(item: IngestItem | ImageInput) -> search_pb2.IngestItem:
    """Builds one item; raises OSError / ValueError / TypeError for a bad local item."""
    if not isinstance(item, IngestItem):
        item = IngestItem(image=item)
    image, local_uri = image_to_proto(item.image)
    msg = search_pb2.IngestItem(image=image, id=item.id)
    if item.metadata is not None:
        if not isinstance(item.metadata, Mapping):
            raise TypeError("metadata must be a mapping (a JSON object)")
        msg.metadata_json = json.dumps(dict(item.metadata), ensure_ascii=False, separators=(",", ":"))
    if item.caption is not None:
        msg.caption.description = item.caption
        msg.caption.keywords.extend(item.keywords)
    if image.WhichOneof("source") == "data":
        msg.source_uri = item.source_uri or local_uri
    return msg


class IngestTracker:
    """Numbers items the way the caller sees them, even when some never leave the client.

    The server numbers items in stream order; an item that fails locally (an unreadable
    file) is not sent, so the tracker keeps the stream-index -> caller-index map, reports
    local failures as FAILED outcomes and adds them into the server's running totals.
    The request side runs in gRPC's thread (sync client): shared state is locked.
    """

    def __init__(self, chunk_size: int, max_chunk_bytes: int) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        self.chunk_size = chunk_size
        self.max_chunk_bytes = max_chunk_bytes
        self._lock = threading.Lock()
        self._stream_to_caller: list[int] = []
        self._local: list[IngestOutcome] = []
        self._local_failed = 0
        self._server = IngestProgress()
        self._chunk: list[search_pb2.IngestItem] = []
        self._chunk_size = 0
        self.requests_done = False

    def encode(self, caller_index: int, item: IngestItem | ImageInput) -> search_pb2.IngestItem | None:
        """The item's message, or None after recording a local failure (unreadable file...)."""
        try:
            return item_to_proto(item)
        except (OSError, ValueError, TypeError) as e:
            item_id = item.id if isinstance(item, IngestItem) else ""
            outcome = IngestOutcome(
                caller_index, item_id, ItemStatus.FAILED, grpc.StatusCode.INVALID_ARGUMENT, _local_reason(e), local=True
            )
            with self._lock:
                self._local.append(outcome)
                self._local_failed += 1
            return None

    def push(self, caller_index: int, msg: search_pb2.IngestItem) -> search_pb2.IngestRequest | None:
        """Adds an item to the current chunk; returns the previous chunk when it is full."""
        ready = None
        item_size = msg.ByteSize()
        if self._chunk and (len(self._chunk) >= self.chunk_size or self._chunk_size + item_size > self.max_chunk_bytes):
            ready = search_pb2.IngestRequest(items=self._chunk)
            self._chunk, self._chunk_size = [], 0
        with self._lock:
            self._stream_to_caller.append(caller_index)
        self._chunk.append(msg)
        self._chunk_size += item_size
        return ready

    def finish(self) -> search_pb2.IngestRequest | None:
        self.requests_done = True
        if not self._chunk:
            return None
        ready = search_pb2.IngestRequest(items=self._chunk)
        self._chunk, self._chunk_size = [], 0
        return ready

    def requests(self, items: Iterable[IngestItem | ImageInput]) -> Iterator[search_pb2.IngestRequest]:
        """Lazily reads and chunks items: memory stays bounded for any number of files."""
        for caller_index, item in enumerate(items):
            msg = self.encode(caller_index, item)
            if msg is not None and (ready := self.push(caller_index, msg)) is not None:
                yield ready
        if (ready := self.finish()) is not None:
            yield ready

    def _progress(self) -> IngestProgress:
        s, lf = self._server, self._local_failed
        return IngestProgress(s.received + lf, s.stored, s.unchanged, s.failed + lf, s.in_flight, s.duplicate,
                              s.deferred)

    def _take_local(self) -> list[IngestOutcome]:
        local, self._local = self._local, []
        return local

    def on_response(self, msg: search_pb2.IngestResponse) -> IngestUpdate:
        with self._lock:
            outcomes = self._take_local()
            for o in msg.outcomes:
                index = self._stream_to_caller[o.index] if o.index < len(self._stream_to_caller) else int(o.index)
                status = _STATUSES.get(o.status, ItemStatus.FAILED)
                code = _CODES.get(o.error.code, grpc.StatusCode.UNKNOWN) if o.HasField("error") else None
                outcomes.append(IngestOutcome(index, o.id, status, code, o.error.message))
            p = msg.progress
            self._server = IngestProgress(p.received, p.stored, p.unchanged, p.failed, p.in_flight, p.duplicate,
                                          p.deferred)
            return IngestUpdate(tuple(outcomes), self._progress())

    def flush(self) -> IngestUpdate | None:
        """Local failures not yet reported (e.g. the last items, or all of them)."""
        with self._lock:
            local = self._take_local()
            if not local:
                return None
            return IngestUpdate(tuple(local), self._progress())


def _local_reason(e: Exception) -> str:
    if isinstance(e, FileNotFoundError):
        return f"file not found: {e.filename}"
    if isinstance(e, PermissionError):
        return f"permission denied: {e.filename}"
    if isinstance(e, IsADirectoryError):
        return f"is a directory: {e.filename}"
    return f"{type(e).__name__}: {e}"
