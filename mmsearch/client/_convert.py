"""Protobuf <-> client types, and the ingest bookkeeping shared by the sync and async clients."""
from __future__ import annotations

import io
import json
import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from mmsearch.client.types import (
    BackfillOutcome,
    BackfillProgress,
    BackfillStatus,
    BackfillUpdate,
    Fusion,
    FusionMethod,
    GetResult,
    Hit,
    ImageInput,
    IngestItem,
    IngestOutcome,
    IngestProgress,
    IngestUpdate,
    ItemStatus,
    Record,
    SearchError,
    SearchResult,
    SearchTimings,
    Stats,
    Target,
)
from mmsearch.common.v1 import types_pb2
from mmsearch.search.v1 import search_pb2

_TARGETS = {
    Target.IMAGE: search_pb2.TARGET_IMAGE,
    Target.CAPTION: search_pb2.TARGET_CAPTION,
    Target.HYBRID: search_pb2.TARGET_HYBRID,
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
        raise ValueError(f"unknown target {target!r}: one of image, caption, hybrid") from None


def coerce_fusion(fusion: Fusion | FusionMethod | str | None) -> Fusion | None:
    if fusion is None or isinstance(fusion, Fusion):
        return fusion
    if isinstance(fusion, FusionMethod):
        return Fusion(method=fusion)
    try:
        return Fusion(method=FusionMethod(str(fusion).lower()))
    except ValueError:
        raise ValueError(f"unknown fusion {fusion!r}: one of rrf, weighted") from None


def build_search_request(
    text: str | None = None,
    *,
    image: ImageInput | None = None,
    instruction: str | None = None,
    instruction_weight: float = 0.0,
    vector: Sequence[float] | None = None,
    target: Target | str = Target.IMAGE,
    fusion: Fusion | FusionMethod | str | None = None,
    top_k: int = 10,
    offset: int = 0,
    filter: str = "",
    output_fields: Sequence[str] = (),
) -> search_pb2.SearchRequest:
    """One request from keyword arguments: text, image, image + instruction, or a vector."""
    given = sum(x is not None for x in (text, image, vector))
    if given != 1:
        raise ValueError("give exactly one query: text=, image= (optionally with instruction=) or vector=")
    if instruction is not None and image is None:
        raise ValueError("instruction= needs image= (a composed query)")
    request = search_pb2.SearchRequest(
        target=_TARGETS[coerce_target(target)],
        top_k=top_k,
        offset=offset,
        filter=filter or "",
        output_fields=list(output_fields),
    )
    if text is not None:
        request.query.text = text
    elif vector is not None:
        request.query_vector.values.extend(float(v) for v in vector)
    else:
        assert image is not None
        msg, _ = image_to_proto(image)
        if instruction is not None:
            request.query.composed.image.CopyFrom(msg)
            request.query.composed.instruction = instruction
            request.query.composed.instruction_weight = instruction_weight
        else:
            request.query.image.CopyFrom(msg)
    fused = coerce_fusion(fusion)
    if fused is not None:
        request.fusion.method = _FUSIONS[fused.method]
        request.fusion.rrf_k = fused.rrf_k
        request.fusion.image_weight = fused.image_weight
        request.fusion.caption_weight = fused.caption_weight
    return request


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
    )


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
