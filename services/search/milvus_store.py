"""The Milvus collection behind search: schema, model guard, reads and writes.

Uses pymilvus' `MilvusClient`, so the same code serves an embedded Milvus Lite file and a
Milvus server / cluster. The client is synchronous; calls run on a small thread pool so
the event loop never blocks. The client is created lazily and dropped after connection
errors, so a restarted Milvus is picked up again without restarting the service.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from pymilvus import AnnSearchRequest, DataType, MilvusClient, RRFRanker, WeightedRanker
from pymilvus.exceptions import MilvusException, MilvusUnavailableException

from services.common.errors import FailedPrecondition, InvalidInput, Unavailable
from services.search import fields as F
from services.search.metrics import MILVUS_SECONDS
from services.search.settings import SearchSettings

T = TypeVar("T")

PROP_MODEL = "mmsearch.embedder_model_id"
PROP_DIM = "mmsearch.dimension"
SCALAR_FIELDS = ["id", "content_sha256", "fingerprint", *(f for f in F.OUTPUT_FIELDS.values() if f != F.CAPTION_PENDING)]


@dataclass(frozen=True)
class CollectionInfo:
    """What the collection records about itself."""

    model_id: str
    dimension: int
    # Collections created before deferred captions have no `caption_pending` field (and
    # Milvus Lite cannot add one): their rows are all "not pending" and Ingest cannot defer.
    has_caption_pending: bool


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


def _is_connection_error(e: BaseException) -> bool:
    if isinstance(e, MilvusUnavailableException):
        return True
    text = str(e).lower()
    return any(s in text for s in ("unavailable", "connect", "deadline", "timeout", "closed channel", "fail connecting"))


def _is_released(e: MilvusException) -> bool:
    text = str(e).lower()
    return "released" in text or "not loaded" in text


class _MilvusLiteUnimplemented(logging.Filter):
    """Embedded Milvus Lite runs a gRPC server inside this process that does not
    implement some RPCs pymilvus tries first (AllocTimestamp) and then does without; grpc
    logs each of those as an error with a traceback. Drop exactly those records."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (isinstance(error, NotImplementedError) and str(error) == "Method not implemented!")


_MILVUS_LITE_NOISE = _MilvusLiteUnimplemented()


def milvus_tls_kwargs(settings: SearchSettings) -> dict[str, Any]:
    """pymilvus' TLS arguments from SEARCH_MILVUS_TLS__* (and an https:// URI).

    pymilvus names them after Milvus' server-side files: `server_pem_path` is the root
    certificate that verifies the server (one-way TLS, tlsMode 1); a client certificate
    (tlsMode 2) goes as `client_pem_path` + `client_key_path` with the CA in `ca_pem_path`.
    """
    tls = settings.milvus_tls
    if not (tls.enabled or settings.milvus_uri.lower().startswith("https://")):
        return {}
    kwargs: dict[str, Any] = {"secure": True}
    if tls.cert_file is not None and tls.key_file is not None and tls.ca_file is not None:
        kwargs.update(client_pem_path=str(tls.cert_file), client_key_path=str(tls.key_file), ca_pem_path=str(tls.ca_file))
    elif tls.ca_file is not None:
        kwargs["server_pem_path"] = str(tls.ca_file)
    if tls.server_name_override:
        kwargs["server_name"] = tls.server_name_override
    return kwargs


class MilvusStore:
    def __init__(self, settings: SearchSettings) -> None:
        self.settings = settings
        self.collection = settings.collection
        self._client: MilvusClient | None = None
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=settings.milvus_threads, thread_name_prefix="milvus")
        # Learnt from the collection (or set when creating it); None until it exists.
        self.info: CollectionInfo | None = None

    @property
    def mode(self) -> str:
        return "server" if "://" in self.settings.milvus_uri else "embedded"

    # --- plumbing ---------------------------------------------------------------------

    def _get_client(self) -> MilvusClient:
        with self._lock:
            if self._client is None:
                token = self.settings.milvus_token.get_secret_value() if self.settings.milvus_token else ""
                uri = self.settings.milvus_uri
                if self.mode == "embedded":
                    from pathlib import Path

                    Path(uri).parent.mkdir(parents=True, exist_ok=True)
                    # The embedded server is a synchronous grpc server (logger "grpc._server");
                    # our own services run grpc.aio, which logs elsewhere.
                    logging.getLogger("grpc._server").addFilter(_MILVUS_LITE_NOISE)
                self._client = MilvusClient(
                    uri=uri, token=token, db_name=self.settings.milvus_db_name, timeout=self.settings.milvus_timeout_s,
                    **({} if self.mode == "embedded" else milvus_tls_kwargs(self.settings)),
                )
            return self._client

    def _drop_client(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001, S110 - closing a broken client must not mask the real error
                pass

    async def _call(self, op: str, fn: Callable[[MilvusClient], T], filter_expr: str = "") -> T:
        def run() -> T:
            start = time.perf_counter()
            try:
                return fn(self._get_client())
            finally:
                MILVUS_SECONDS.labels(op).observe(time.perf_counter() - start)

        try:
            try:
                return await asyncio.get_running_loop().run_in_executor(self._pool, run)
            except MilvusException as e:
                if not _is_released(e):
                    raise
                # A restarted Milvus comes back with the collection released: load it, retry once.
                await asyncio.get_running_loop().run_in_executor(self._pool, self._load)
                return await asyncio.get_running_loop().run_in_executor(self._pool, run)
        except MilvusException as e:
            # A rejected filter's message echoes the caller's expression, which may hold
            # words such as "timeout" or "connect": when Milvus still answers, the filter
            # is at fault (never drop the shared client for a caller's bad expression).
            if _is_connection_error(e) and not (filter_expr and await self._answers()):
                self._drop_client()
                raise Unavailable(f"Milvus is unavailable ({op}): {e.message}") from None
            if filter_expr:
                raise InvalidInput(f"Milvus rejected the filter expression: {e.message}") from None
            raise Unavailable(f"Milvus {op} failed: {e.message}") from None
        except (ConnectionError, OSError, TimeoutError) as e:
            self._drop_client()
            raise Unavailable(f"Milvus is unavailable ({op}): {e}") from None
        except Exception as e:  # grpc errors from a dead server surface as various types
            if _is_connection_error(e):
                self._drop_client()
                raise Unavailable(f"Milvus is unavailable ({op}): {type(e).__name__}") from None
            raise

    async def _answers(self) -> bool:
        """Milvus answers a trivial request right now."""
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._pool, lambda: self._get_client().has_collection(self.collection))
            return True
        except Exception:  # noqa: BLE001 - any failure means "does not answer"
            return False

    def _search_params(self, window: int) -> dict[str, Any]:
        s = self.settings
        params: dict[str, Any] = {}
        if s.index_type == "HNSW":
            params = {"ef": max(s.hnsw_ef, window)}
        elif s.index_type == "IVF_FLAT":
            params = {"nprobe": s.ivf_nprobe}
        return {"metric_type": s.metric_type, "params": params}

    def _similarity(self, distance: float) -> float:
        # COSINE and IP are similarities already; L2 is a distance.
        return -distance if self.settings.metric_type == "L2" else distance

    # --- lifecycle ----------------------------------------------------------------------

    def _load(self) -> None:
        self._get_client().load_collection(self.collection)

    async def ping(self) -> bool:
        """Milvus answers and the collection is loaded (loading it again after a restart)."""

        def run(c: MilvusClient) -> bool:
            if c.has_collection(self.collection):
                state = str(c.get_load_state(self.collection).get("state", ""))
                if "NotLoad" in state:
                    c.load_collection(self.collection)
            return True

        return await self._call("ping", run)

    def _describe(self, c: MilvusClient) -> CollectionInfo | None:
        if not c.has_collection(self.collection):
            return None
        described = c.describe_collection(self.collection)
        props = described.get("properties", {}) or {}
        names = {f.get("name") for f in described.get("fields", [])}
        dim = props.get(PROP_DIM)
        return CollectionInfo(str(props.get(PROP_MODEL) or ""), int(dim) if str(dim or "").isdigit() else 0,
                              F.CAPTION_PENDING in names)

    async def describe(self) -> CollectionInfo | None:
        """The collection's model, dimension and fields; None while it does not exist."""
        info = await self._call("describe", self._describe)
        if info is not None:
            self.info = info
        return info

    async def require(self) -> CollectionInfo:
        """The collection's info, or UNAVAILABLE while it does not exist yet."""
        if self.info is not None:
            return self.info
        info = await self.describe()
        if info is None:
            raise Unavailable(
                f"collection {self.collection!r} does not exist yet: it is created when the embedder first "
                "answers (its model and dimension define it)"
            )
        return info

    @property
    def pending_supported(self) -> bool:
        return self.info is not None and self.info.has_caption_pending

    def scalar_fields(self) -> list[str]:
        return SCALAR_FIELDS + ([F.CAPTION_PENDING] if self.pending_supported else [])

    def caption_filter(self, filter_expr: str) -> str:
        """`filter_expr` restricted to rows whose caption vector is real (not pending)."""
        if not self.pending_supported:
            return filter_expr
        own = f"{F.CAPTION_PENDING} == false"
        return f"({filter_expr}) and {own}" if filter_expr else own

    async def ensure_collection(self, model_id: str, dimension: int) -> None:
        """Creates the collection, or checks that it was built by this embedding model."""

        def run(c: MilvusClient) -> None:
            if c.has_collection(self.collection):
                props = c.describe_collection(self.collection).get("properties", {}) or {}
                built_model, built_dim = props.get(PROP_MODEL), props.get(PROP_DIM)
                if built_model != model_id or str(built_dim) != str(dimension):
                    raise FailedPrecondition(
                        f"collection {self.collection!r} was built by embedding model {built_model!r} "
                        f"(dimension {built_dim}), but the embedder now serves {model_id!r} (dimension {dimension}). "
                        "Vectors from different models cannot be mixed. To migrate: set SEARCH_COLLECTION to a new "
                        "name and re-ingest your images (ingest is idempotent), then drop the old collection; or "
                        "point the embedder back at the original model."
                    )
                c.load_collection(self.collection)
                return
            schema = c.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=F.MAX_ID_CHARS)
            schema.add_field("content_sha256", DataType.VARCHAR, max_length=64)
            schema.add_field("fingerprint", DataType.VARCHAR, max_length=64)
            schema.add_field("uri", DataType.VARCHAR, max_length=F.MAX_URI_CHARS)
            schema.add_field("caption", DataType.VARCHAR, max_length=F.MAX_CAPTION_CHARS)
            schema.add_field(
                "keywords", DataType.ARRAY, element_type=DataType.VARCHAR,
                max_capacity=F.MAX_KEYWORDS, max_length=F.MAX_KEYWORD_CHARS,
            )
            schema.add_field("metadata", DataType.JSON)
            schema.add_field("embedder_model_id", DataType.VARCHAR, max_length=256)
            schema.add_field("captioner_model_id", DataType.VARCHAR, max_length=256)
            schema.add_field("ingested_at_ms", DataType.INT64)
            schema.add_field(F.CAPTION_PENDING, DataType.BOOL)
            schema.add_field(F.IMAGE_VECTOR, DataType.FLOAT_VECTOR, dim=dimension)
            schema.add_field(F.CAPTION_VECTOR, DataType.FLOAT_VECTOR, dim=dimension)
            index = c.prepare_index_params()
            for field in (F.IMAGE_VECTOR, F.CAPTION_VECTOR):
                index.add_index(field, index_type=self.settings.index_type, metric_type=self.settings.metric_type,
                                params=self._index_request_params())
            c.create_collection(
                self.collection, schema=schema, index_params=index,
                properties={PROP_MODEL: model_id, PROP_DIM: str(dimension)},
            )

        await self._call("ensure_collection", run)
        await self.describe()

    def _index_params(self) -> dict[str, Any]:
        s = self.settings
        if s.index_type == "HNSW":
            return {"M": s.hnsw_m, "efConstruction": s.hnsw_ef_construction}
        if s.index_type == "IVF_FLAT":
            return {"nlist": s.ivf_nlist}
        return {}

    def _index_request_params(self) -> dict[str, Any]:
        """Build params in both wire forms. pymilvus >= 2.4 sends each build param as its
        own key (`M`, `nlist`), which Milvus reads; Milvus Lite 3.x reads only the legacy
        JSON `params` key and silently built its own defaults instead (IVF_FLAT with nlist
        128 instead of SEARCH_IVF_NLIST; see docs/benchmarks.md). Milvus accepts both forms
        (it merges the legacy key), so sending both makes every backend build what is
        configured."""
        params = self._index_params()
        return {**params, "params": dict(params)} if params else {}

    async def index_type(self) -> str:
        info = await self._call("describe_index", lambda c: c.describe_index(self.collection, F.IMAGE_VECTOR))
        return str(info.get("index_type", self.settings.index_type))

    async def close(self) -> None:
        self._drop_client()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- writes -------------------------------------------------------------------------

    async def fingerprints(self, ids: Sequence[str]) -> dict[str, str]:
        """id -> stored fingerprint, for the ids that exist."""
        if not ids:
            return {}
        await self.require()
        rows = await self._call("get", lambda c: c.get(self.collection, ids=list(ids), output_fields=["fingerprint"]))
        return {r["id"]: r["fingerprint"] for r in rows}

    async def upsert(self, rows: Sequence[StoredRow]) -> None:
        await self.require()
        pending = self.pending_supported
        if not pending and any(r.caption_pending for r in rows):
            raise FailedPrecondition(
                f"collection {self.collection!r} predates deferred captions (no {F.CAPTION_PENDING} field)")
        data = [
            {
                "id": r.id, "content_sha256": r.content_sha256, "fingerprint": r.fingerprint, "uri": r.uri,
                "caption": r.caption, "keywords": r.keywords, "metadata": r.metadata,
                "embedder_model_id": r.embedder_model_id, "captioner_model_id": r.captioner_model_id,
                "ingested_at_ms": r.ingested_at_ms,
                F.IMAGE_VECTOR: r.image_vector, F.CAPTION_VECTOR: r.caption_vector,
                **({F.CAPTION_PENDING: r.caption_pending} if pending else {}),
            }
            for r in rows
        ]
        await self._call("upsert", lambda c: c.upsert(self.collection, data))

    async def pending_ids(self, limit: int) -> list[str]:
        """Ids of rows whose caption is pending (at most `limit`), sorted: a backfill's
        snapshot of its work."""
        if not self.pending_supported:
            return []

        def run(c: MilvusClient) -> list[str]:
            it = c.query_iterator(self.collection, batch_size=1000, filter=f"{F.CAPTION_PENDING} == true",
                                  output_fields=["id"])
            ids: list[str] = []
            try:
                while len(ids) < limit:
                    batch = it.next()
                    if not batch:
                        break
                    ids += [r["id"] for r in batch]
            finally:
                it.close()
            return sorted(ids)[:limit]

        return await self._call("query", run)

    async def rows_with_image_vector(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Stored rows with their image vector (a backfill keeps it as stored)."""
        fields = [*self.scalar_fields(), F.IMAGE_VECTOR]
        rows = await self._call("get", lambda c: c.get(self.collection, ids=list(ids), output_fields=fields))
        return {r["id"]: r for r in rows}

    async def count_pending(self) -> int:
        if not self.pending_supported:
            return 0
        rows = await self._call("count", lambda c: c.query(
            self.collection, filter=f"{F.CAPTION_PENDING} == true", output_fields=["count(*)"]))
        return int(rows[0]["count(*)"])

    async def delete(self, ids: Sequence[str]) -> int:
        existing = await self.fingerprints(ids)
        if existing:
            await self._call("delete", lambda c: c.delete(self.collection, ids=list(existing)))
        return len(existing)

    # --- reads --------------------------------------------------------------------------

    async def get(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        await self.require()
        fields = self.scalar_fields()
        rows = await self._call("get", lambda c: c.get(self.collection, ids=list(ids), output_fields=fields))
        return {r["id"]: r for r in rows}

    async def count(self) -> int:
        await self.require()
        rows = await self._call("count", lambda c: c.query(self.collection, filter="", output_fields=["count(*)"]))
        return int(rows[0]["count(*)"])

    async def search(
        self, vector: np.ndarray, field: str, top_k: int, offset: int, filter_expr: str, output_fields: list[str]
    ) -> list[RawHit]:
        await self.require()
        if field == F.CAPTION_VECTOR:
            filter_expr = self.caption_filter(filter_expr)

        def run(c: MilvusClient) -> Any:
            return c.search(
                self.collection, data=[vector], anns_field=field, limit=top_k, offset=offset,
                filter=filter_expr, output_fields=output_fields, search_params=self._search_params(offset + top_k),
            )

        result = await self._call("search", run, filter_expr)
        return [RawHit(h["id"], self._similarity(h["distance"]), h.get("entity", {})) for h in result[0]]

    async def hybrid_search(
        self, vector: np.ndarray, top_k: int, offset: int, filter_expr: str, output_fields: list[str],
        rrf_k: int | None, weights: tuple[float, float] | None,
    ) -> list[RawHit]:
        """Searches both vector fields and fuses them in Milvus (RRF or weighted)."""
        window = offset + top_k
        candidates = max(window, self.settings.hybrid_candidates)
        await self.require()
        # Pending rows take part through their image vector only (no made-up caption leg).
        exprs = {F.IMAGE_VECTOR: filter_expr, F.CAPTION_VECTOR: self.caption_filter(filter_expr)}

        def run(c: MilvusClient) -> Any:
            params = self._search_params(candidates)
            reqs = [AnnSearchRequest([vector], field, params, limit=candidates, expr=exprs[field] or None)
                    for field in (F.IMAGE_VECTOR, F.CAPTION_VECTOR)]
            ranker = WeightedRanker(*weights) if weights else RRFRanker(rrf_k or 60)
            return c.hybrid_search(self.collection, reqs, ranker, limit=window, output_fields=output_fields)

        result = await self._call("hybrid_search", run, filter_expr)
        # Fused scores are already "higher is better"; pagination is applied on the fused list.
        return [RawHit(h["id"], float(h["distance"]), h.get("entity", {})) for h in result[0]][offset:]

