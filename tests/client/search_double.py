"""An in-memory implementation of the Search contract, for client and CLI unit tests.

It runs as a real gRPC server on loopback (real channels, deadlines, retries, TLS,
metadata), with knobs to fail calls; ranking is a toy (word overlap with the caption).
The end-to-end tests (tests/cli/test_cli_e2e.py) run against the real services.
"""
from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from PIL import Image

from mmsearch.search.v1 import search_pb2, search_pb2_grpc


@dataclass
class Stored:
    id: str
    uri: str
    caption: str
    keywords: list[str]
    metadata_json: str
    sha: str


@dataclass
class Knobs:
    # Fail this many upcoming unary calls with UNAVAILABLE (retry tests).
    unavailable_calls: int = 0
    # Sleep this long in each unary call (deadline tests).
    delay_s: float = 0.0
    # When set, calls without `authorization: Bearer <token>` are UNAUTHENTICATED.
    token: str | None = None
    calls: dict[str, int] = field(default_factory=dict)
    last_metadata: dict[str, str] = field(default_factory=dict)
    ingest_chunks: list[int] = field(default_factory=list)


class SearchDouble(search_pb2_grpc.SearchServicer):
    def __init__(self) -> None:
        self.items: dict[str, Stored] = {}
        self.knobs = Knobs()
        self._lock = threading.Lock()

    def _enter(self, name: str, context: grpc.ServicerContext) -> None:
        md = {k: v for k, v in context.invocation_metadata()}
        with self._lock:
            self.knobs.calls[name] = self.knobs.calls.get(name, 0) + 1
            self.knobs.last_metadata = md
            fail = self.knobs.unavailable_calls > 0 and name != "Ingest"
            if fail:
                self.knobs.unavailable_calls -= 1
        if self.knobs.token is not None and md.get("authorization") != f"Bearer {self.knobs.token}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
        if fail:
            context.abort(grpc.StatusCode.UNAVAILABLE, "embedder unreachable (injected)")
        if self.knobs.delay_s:
            time.sleep(self.knobs.delay_s)

    def Ingest(self, request_iterator, context):
        self._enter("Ingest", context)
        index = 0
        counts = {"stored": 0, "unchanged": 0, "failed": 0}
        for request in request_iterator:
            self.knobs.ingest_chunks.append(len(request.items))
            outcomes = []
            for item in request.items:
                outcomes.append(self._ingest_one(index, item, counts))
                index += 1
            yield search_pb2.IngestResponse(
                outcomes=outcomes,
                progress=search_pb2.IngestProgress(received=index, in_flight=0, **counts),
            )

    def _ingest_one(self, index: int, item: search_pb2.IngestItem, counts: dict[str, int]) -> search_pb2.ItemOutcome:
        data = item.image.data
        if item.image.WhichOneof("source") == "uri":
            data = item.image.uri.encode()
        sha = hashlib.sha256(data).hexdigest()
        item_id = item.id or sha
        try:
            if item.image.WhichOneof("source") == "data":
                Image.open(io.BytesIO(data)).verify()
        except Exception:  # noqa: BLE001 - any decode error is a failed item
            counts["failed"] += 1
            return search_pb2.ItemOutcome(
                index=index,
                id=item_id,
                status=search_pb2.ITEM_STATUS_FAILED,
                error={"code": grpc.StatusCode.INVALID_ARGUMENT.value[0], "message": "image: cannot decode"},
            )
        with self._lock:
            existing = self.items.get(item_id)
            if existing is not None and existing.sha == sha:
                counts["unchanged"] += 1
                return search_pb2.ItemOutcome(index=index, id=item_id, status=search_pb2.ITEM_STATUS_UNCHANGED)
            label = json.loads(item.metadata_json).get("label", "") if item.metadata_json else ""
            caption = item.caption.description if item.HasField("caption") else f"a photo of {label or 'something'}"
            self.items[item_id] = Stored(
                item_id, item.source_uri or item.image.uri, caption, list(item.caption.keywords), item.metadata_json, sha
            )
        counts["stored"] += 1
        return search_pb2.ItemOutcome(index=index, id=item_id, status=search_pb2.ITEM_STATUS_STORED)

    def Search(self, request, context):
        self._enter("Search", context)
        if request.top_k < 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "top_k must be in [1, 1000]")
        kind = request.query.WhichOneof("kind")
        words = set()
        if kind == "text":
            words = set(request.query.text.lower().split())
        elif kind == "composed":
            words = set(request.query.composed.instruction.lower().split())
        with self._lock:
            ranked = sorted(
                self.items.values(),
                key=lambda s: (-len(words & set(s.caption.lower().split())), s.id),
            )
        if request.filter:
            _, _, value = request.filter.partition("==")
            ranked = [s for s in ranked if json.loads(s.metadata_json or "{}").get("label") == value.strip().strip('"')]
        page = ranked[request.offset : request.offset + request.top_k]
        hits = [
            search_pb2.Hit(
                rank=request.offset + i + 1,
                id=s.id,
                score=1.0 - 0.1 * (request.offset + i),
                uri=s.uri,
                caption=s.caption,
                keywords=s.keywords,
                metadata_json=s.metadata_json,
            )
            for i, s in enumerate(page)
        ]
        return search_pb2.SearchResponse(
            hits=hits,
            target=request.target or search_pb2.TARGET_IMAGE,
            timings=search_pb2.SearchTimings(embed_ms=1.0, milvus_ms=2.0, total_ms=3.5),
        )

    def Get(self, request, context):
        self._enter("Get", context)
        records, missing = [], []
        for i in request.ids:
            s = self.items.get(i)
            if s is None:
                missing.append(i)
            else:
                records.append(
                    search_pb2.Record(
                        id=s.id, uri=s.uri, caption=s.caption, keywords=s.keywords, metadata_json=s.metadata_json, content_sha256=s.sha
                    )
                )
        return search_pb2.GetResponse(records=records, missing_ids=missing)

    def Delete(self, request, context):
        self._enter("Delete", context)
        n = 0
        with self._lock:
            for i in request.ids:
                n += self.items.pop(i, None) is not None
        return search_pb2.DeleteResponse(deleted_count=n)

    def Stats(self, request, context):
        self._enter("Stats", context)
        return search_pb2.StatsResponse(
            collection="test",
            item_count=len(self.items),
            embedder_model_id="double",
            dimension=4,
            captioner_model_id="double",
            index_type="FLAT",
            metric_type="COSINE",
            milvus_mode="embedded",
        )


@dataclass
class RunningDouble:
    servicer: SearchDouble
    server: grpc.Server
    port: int
    health: health.HealthServicer

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop(None)


def start_double(credentials: grpc.ServerCredentials | None = None) -> RunningDouble:
    servicer = SearchDouble()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    search_pb2_grpc.add_SearchServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("mmsearch.search.v1.Search", health_pb2.HealthCheckResponse.SERVING)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return RunningDouble(servicer, server, port, health_servicer)
