"""The Milvus collection behind search (`ports.VectorStore`): schema, model guard, reads
and writes.

Uses pymilvus' `MilvusClient`, so the same code serves an embedded Milvus Lite file and a
Milvus server / cluster. The client is synchronous; calls run on a small thread pool so
the event loop never blocks. The client is created lazily and dropped after connection
errors, so a restarted Milvus is picked up again without restarting the service.
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from pymilvus import AnnSearchRequest, DataType, Function, FunctionType, MilvusClient, RRFRanker, WeightedRanker
from pymilvus.exceptions import MilvusException, MilvusUnavailableException

from services.common import principal
from services.common.errors import FailedPrecondition, InvalidInput, Unavailable
from services.search import fields as F
from services.search.metrics import MILVUS_SECONDS
from services.search.ports import CollectionInfo, DecaySpec, LegQuery, RawHit, SearchOptions, StoredRow
from services.search.settings import SearchSettings, parse_indexed_fields

T = TypeVar("T")

PROP_MODEL = "mmsearch.embedder_model_id"
PROP_DIM = "mmsearch.dimension"
PROP_INDEXED = "mmsearch.indexed_fields"  # "name:type,..." (see SearchSettings.indexed_fields)
_INDEXED_DTYPES = {"string": DataType.VARCHAR, "int": DataType.INT64, "float": DataType.DOUBLE, "bool": DataType.BOOL}
MAX_INDEXED_STRING_CHARS = 512
SCALAR_FIELDS = ["id", "content_sha256", "fingerprint", *(f for f in F.OUTPUT_FIELDS.values() if f != F.CAPTION_PENDING)]


@dataclass(frozen=True)
class Tenancy:
    """The caller's tenant on this collection: how its ids are stored and its rows found.

    The default tenant keeps plain ids (existing data and filters on `id` work as before);
    another tenant's item is stored under "<tenant>~<id>". Every read and write goes
    through `key` / `unkey` / `scope` / `owns`, so no code path sees another tenant's row.
    """

    tenant: str
    enforced: bool  # the collection has the tenant field

    @property
    def plain(self) -> bool:
        return self.tenant == principal.DEFAULT_TENANT

    def key(self, item_id: str) -> str:
        return item_id if self.plain else f"{self.tenant}{F.TENANT_KEY_SEPARATOR}{item_id}"

    def keys(self, ids: Sequence[str]) -> list[str]:
        return [self.key(i) for i in ids]

    def unkey(self, key: str) -> str:
        if self.plain:
            return key
        return key.removeprefix(f"{self.tenant}{F.TENANT_KEY_SEPARATOR}")

    def scope(self, expr: str) -> str:
        """`expr` confined to this tenant. The caller's expression was checked first
        (validation.check_filter: balanced parentheses outside literals, no `tenant`)."""
        if not self.enforced:
            return expr
        own = f'{F.TENANT} == "{self.tenant}"'
        return f"{own} and ({expr})" if expr else own

    def owns(self, row: dict[str, Any], key: str | None = None) -> bool:
        """Defence in depth: a row Milvus returned really is this tenant's."""
        if self.enforced and row.get(F.TENANT) != self.tenant:
            return False
        key = row.get("id") if key is None else key
        if key is None:
            return True
        if self.plain:
            return F.TENANT_KEY_SEPARATOR not in key
        return key.startswith(f"{self.tenant}{F.TENANT_KEY_SEPARATOR}")

    def fields(self, names: Sequence[str]) -> list[str]:
        return [*names, F.TENANT] if self.enforced and F.TENANT not in names else list(names)

    def rows(self, rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Milvus rows -> {caller's id: row with the caller's id, without `tenant`}."""
        out: dict[str, dict[str, Any]] = {}
        for r in rows:
            if not self.owns(r):
                continue
            item_id = self.unkey(r["id"])
            out[item_id] = {**{k: v for k, v in r.items() if k != F.TENANT}, "id": item_id}
        return out


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


class MilvusConnection:
    """One MilvusClient (created lazily, dropped after connection errors so a restarted
    Milvus is picked up again) and its thread pool, shared by every collection's store."""

    def __init__(self, settings: SearchSettings) -> None:
        self.settings = settings
        self._client: MilvusClient | None = None
        self._lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=settings.milvus_threads, thread_name_prefix="milvus")
        # Told (collection, rows) after each write: the flush policy (services/search/flushing.py).
        self.on_write: Callable[[str, int], None] | None = None

    @property
    def mode(self) -> str:
        return self.settings.milvus_mode

    def client(self) -> MilvusClient:
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

    def drop(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001, S110 - closing a broken client must not mask the real error
                pass

    def close(self) -> None:
        self.drop()
        self.pool.shutdown(wait=False, cancel_futures=True)


class MilvusStore:
    """One physical collection. `collection` defaults to SEARCH_COLLECTION; the index's
    versions (services/search/versions.py) make one store per version, on one connection."""

    def __init__(
        self, settings: SearchSettings, collection: str | None = None, connection: MilvusConnection | None = None
    ) -> None:
        self.settings = settings
        self.collection = collection or settings.collection
        self.connection = connection or MilvusConnection(settings)
        # Learnt from the collection (or set when creating it); None until it exists.
        self.info: CollectionInfo | None = None

    @property
    def mode(self) -> str:
        return self.connection.mode

    # --- plumbing ---------------------------------------------------------------------

    @property
    def _pool(self) -> ThreadPoolExecutor:
        return self.connection.pool

    def _get_client(self) -> MilvusClient:
        return self.connection.client()

    def _drop_client(self) -> None:
        self.connection.drop()

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
                              F.CAPTION_PENDING in names, F.KEYWORD_SPARSE in names,
                              parse_indexed_fields(str(props.get(PROP_INDEXED) or "")), F.TENANT in names)

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

    async def tenancy(self) -> Tenancy:
        """The calling tenant on this collection (FAILED_PRECONDITION for a non-default
        tenant on a collection created before tenants)."""
        info = await self.require()
        tenant = principal.current().tenant
        if not info.has_tenant and tenant != principal.DEFAULT_TENANT:
            raise FailedPrecondition(
                f"collection {self.collection!r} was created before tenants (no {F.TENANT!r} field) and serves the "
                f"default tenant only, not {tenant!r}. To migrate without downtime: `mmsearch index create --model "
                f"{info.model_id}` (a new version, with the tenant field), `mmsearch index backfill`, `mmsearch index "
                "promote` (docs/operations.md, \"Change the embedding model\"); existing items stay the default "
                "tenant's.")
        return Tenancy(tenant, info.has_tenant)

    def stored_key(self, item_id: str) -> str:
        """The primary key the calling tenant's item `item_id` is stored under."""
        return Tenancy(principal.current().tenant, True).key(item_id)

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
                        "Vectors from different models cannot be mixed. To change the model without downtime: keep "
                        f"an embedder serving {built_model!r} mapped in SEARCH_MODEL_EMBEDDERS, then `mmsearch index "
                        f"create --model {model_id}`, backfill and promote (docs/operations.md, \"Change the embedding "
                        "model\"); or point the embedder back at the original model."
                    )
                c.load_collection(self.collection)
                return
            schema = c.create_schema(auto_id=False, enable_dynamic_field=False)
            # "<tenant>~<id>" for a non-default tenant's item (see `Tenancy`).
            schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=F.MAX_KEY_CHARS)
            # Partition key: one tenant's searches and queries scan only its partitions.
            schema.add_field(F.TENANT, DataType.VARCHAR, max_length=F.MAX_TENANT_CHARS, is_partition_key=True)
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
            # Default false: rows written without it (older writers, bulk loads) are "captioned".
            schema.add_field(F.CAPTION_PENDING, DataType.BOOL, default_value=False)
            schema.add_field(F.IMAGE_VECTOR, DataType.FLOAT_VECTOR, dim=dimension)
            schema.add_field(F.CAPTION_VECTOR, DataType.FLOAT_VECTOR, dim=dimension)
            # The keyword leg: Milvus analyses the text and keeps BM25 statistics itself.
            schema.add_field(F.KEYWORD_TEXT, DataType.VARCHAR, max_length=F.MAX_KEYWORD_TEXT_CHARS,
                             enable_analyzer=True, analyzer_params=self.settings.keyword_analyzer)
            schema.add_field(F.KEYWORD_SPARSE, DataType.SPARSE_FLOAT_VECTOR)
            schema.add_function(Function(name="keyword_bm25", function_type=FunctionType.BM25,
                                         input_field_names=[F.KEYWORD_TEXT], output_field_names=[F.KEYWORD_SPARSE]))
            indexed = self.settings.indexed_fields
            for name, kind in indexed.items():
                extra = {"max_length": MAX_INDEXED_STRING_CHARS} if kind == "string" else {}
                schema.add_field(name, _INDEXED_DTYPES[kind], nullable=True, **extra)
            index = c.prepare_index_params()
            for vector_field in (F.IMAGE_VECTOR, F.CAPTION_VECTOR):
                index.add_index(vector_field, index_type=self.settings.index_type,
                                metric_type=self.settings.metric_type, params=self._index_request_params())
            index.add_index(F.KEYWORD_SPARSE, index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
            for name in indexed:
                index.add_index(name, index_type="INVERTED")
            c.create_collection(
                self.collection, schema=schema, index_params=index,
                properties={PROP_MODEL: model_id, PROP_DIM: str(dimension), PROP_INDEXED: format_indexed(indexed)},
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
        self.connection.close()

    # --- writes -------------------------------------------------------------------------

    async def fingerprints(self, ids: Sequence[str]) -> dict[str, str]:
        """id -> stored fingerprint, for the ids that exist."""
        if not ids:
            return {}
        t = await self.tenancy()
        keys, fields = t.keys(ids), t.fields(["fingerprint"])
        rows = await self._call("get", lambda c: c.get(self.collection, ids=keys, output_fields=fields))
        return {i: r["fingerprint"] for i, r in t.rows(rows).items()}

    def indexed_values(self, metadata: dict[str, Any]) -> dict[str, Any]:
        """The typed columns of one item (null where a key is missing); InvalidInput names
        the field whose value has the wrong type."""
        fields = self.info.indexed_fields if self.info is not None else self.settings.indexed_fields
        out: dict[str, Any] = {}
        for name, kind in fields.items():
            value = metadata.get(name)
            if value is not None and not _fits(value, kind):
                raise InvalidInput(f"metadata field {name!r} is indexed as {kind}, got {type(value).__name__} "
                                   f"{str(value)[:40]!r}")
            if kind == "string" and value is not None and len(value) > MAX_INDEXED_STRING_CHARS:
                raise InvalidInput(f"metadata field {name!r} is longer than {MAX_INDEXED_STRING_CHARS} characters")
            out[name] = float(value) if kind == "float" and value is not None else value
        return out

    async def upsert(self, rows: Sequence[StoredRow]) -> None:
        t = await self.tenancy()
        await self._upsert([(t.key(r.id), t.tenant, r) for r in rows], t.enforced)

    async def _upsert(self, rows: Sequence[tuple[str, str, StoredRow]], with_tenant: bool) -> None:
        info = self.info
        assert info is not None
        pending = self.pending_supported
        if not pending and any(r.caption_pending for _, _, r in rows):
            raise FailedPrecondition(
                f"collection {self.collection!r} predates deferred captions (no {F.CAPTION_PENDING} field)")
        data = [
            {
                "id": key, **({F.TENANT: tenant} if with_tenant else {}),
                "content_sha256": r.content_sha256, "fingerprint": r.fingerprint, "uri": r.uri,
                "caption": r.caption, "keywords": r.keywords, "metadata": r.metadata,
                "embedder_model_id": r.embedder_model_id, "captioner_model_id": r.captioner_model_id,
                "ingested_at_ms": r.ingested_at_ms,
                F.IMAGE_VECTOR: r.image_vector, F.CAPTION_VECTOR: r.caption_vector,
                **({F.CAPTION_PENDING: r.caption_pending} if pending else {}),
                **({F.KEYWORD_TEXT: keyword_text(r.caption, r.keywords)} if info.has_keyword else {}),
                **self.indexed_values(r.metadata),
            }
            for key, tenant, r in rows
        ]
        await self._call("upsert", lambda c: c.upsert(self.collection, data))
        if self.connection.on_write is not None:
            self.connection.on_write(self.collection, len(data))

    async def flush(self) -> None:
        """Seals the collection's unflushed rows, so searches stop scanning them by brute
        force (services/search/flushing.py decides when)."""
        await self._call("flush", lambda c: c.flush(self.collection))

    # --- the whole collection, every tenant (the admin's model change) -------------------

    async def all_keys(self) -> list[str]:
        """Every stored key (all tenants), sorted."""
        await self.require()

        def run(c: MilvusClient) -> list[str]:
            it = c.query_iterator(self.collection, batch_size=2000, filter='id != ""', output_fields=["id"])
            keys: list[str] = []
            try:
                while batch := it.next():
                    keys += [r["id"] for r in batch]
            finally:
                it.close()
            return sorted(keys)

        return await self._call("query_iterator", run)

    async def rows_by_key(self, keys: Sequence[str], vectors: bool = False) -> dict[str, dict[str, Any]]:
        """Stored rows by key (all tenants), with the tenant and the pending mark when the
        collection has them."""
        info = await self.require()
        fields = [*self.scalar_fields(), *([F.TENANT] if info.has_tenant else []),
                  *([F.IMAGE_VECTOR, F.CAPTION_VECTOR] if vectors else [])]
        rows = await self._call("get", lambda c: c.get(self.collection, ids=list(keys), output_fields=fields))
        return {r["id"]: r for r in rows}

    async def fingerprints_by_key(self, keys: Sequence[str]) -> dict[str, str]:
        """Stored key -> fingerprint (all tenants), for the keys that exist."""
        await self.require()
        rows = await self._call("get", lambda c: c.get(self.collection, ids=list(keys), output_fields=["fingerprint"]))
        return {r["id"]: r["fingerprint"] for r in rows}

    async def upsert_keyed(self, rows: Sequence[tuple[str, str, StoredRow]]) -> None:
        """Writes rows under their stored keys and tenants (StoredRow.id is ignored)."""
        info = await self.require()
        await self._upsert(rows, info.has_tenant)

    async def delete_keys(self, keys: Sequence[str]) -> None:
        if keys:
            await self._call("delete", lambda c: c.delete(self.collection, ids=list(keys)))

    async def count_all(self) -> int:
        """Rows of every tenant."""
        await self.require()
        rows = await self._call("count", lambda c: c.query(self.collection, filter="", output_fields=["count(*)"]))
        return int(rows[0]["count(*)"])

    async def pending_ids(self, limit: int) -> list[str]:
        """Ids of rows whose caption is pending (at most `limit`), sorted: a backfill's
        snapshot of its work."""
        t = await self.tenancy()
        if not self.pending_supported:
            return []
        expr, fields = t.scope(f"{F.CAPTION_PENDING} == true"), t.fields(["id"])

        def run(c: MilvusClient) -> list[str]:
            it = c.query_iterator(self.collection, batch_size=1000, filter=expr, output_fields=fields)
            ids: list[str] = []
            try:
                while len(ids) < limit:
                    batch = it.next()
                    if not batch:
                        break
                    ids += list(t.rows(batch))
            finally:
                it.close()
            return sorted(ids)[:limit]

        return await self._call("query", run)

    async def rows_with_image_vector(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Stored rows with their image vector (a backfill keeps it as stored)."""
        t = await self.tenancy()
        keys, fields = t.keys(ids), t.fields([*self.scalar_fields(), F.IMAGE_VECTOR])
        rows = await self._call("get", lambda c: c.get(self.collection, ids=keys, output_fields=fields))
        return t.rows(rows)

    async def count_pending(self) -> int:
        t = await self.tenancy()
        if not self.pending_supported:
            return 0
        expr = t.scope(f"{F.CAPTION_PENDING} == true")
        rows = await self._call("count", lambda c: c.query(self.collection, filter=expr, output_fields=["count(*)"]))
        return int(rows[0]["count(*)"])

    async def delete(self, ids: Sequence[str]) -> int:
        t = await self.tenancy()
        existing = await self.fingerprints(ids)  # this tenant's only: another's id is "missing"
        if existing:
            keys = t.keys(list(existing))
            await self._call("delete", lambda c: c.delete(self.collection, ids=keys))
        return len(existing)

    # --- reads --------------------------------------------------------------------------

    async def get(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        t = await self.tenancy()
        keys, fields = t.keys(ids), t.fields(self.scalar_fields())
        rows = await self._call("get", lambda c: c.get(self.collection, ids=keys, output_fields=fields))
        return t.rows(rows)

    async def count(self) -> int:
        """The calling tenant's items."""
        t = await self.tenancy()
        expr = t.scope("")
        rows = await self._call("count", lambda c: c.query(self.collection, filter=expr, output_fields=["count(*)"]))
        return int(rows[0]["count(*)"])

    async def stored_vectors(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Stored vectors (and keyword text, pending mark) of items: "more like this" and
        stored-id examples query with them."""
        info = await self.require()
        t = await self.tenancy()
        fields = t.fields([F.IMAGE_VECTOR, F.CAPTION_VECTOR, *([F.KEYWORD_TEXT] if info.has_keyword else []),
                           *([F.CAPTION_PENDING] if info.has_caption_pending else [])])
        keys = t.keys(ids)
        rows = await self._call("get", lambda c: c.get(self.collection, ids=keys, output_fields=fields))
        return t.rows(rows)

    def _leg_filter(self, leg_field: str, filter_expr: str) -> str:
        # Pending rows have no real caption (no caption vector, empty keyword text).
        return filter_expr if leg_field == F.IMAGE_VECTOR else self.caption_filter(filter_expr)

    def _leg_params(self, leg_field: str, window: int, min_score: float | None = None) -> dict[str, Any]:
        if leg_field == F.KEYWORD_SPARSE:
            return {"metric_type": "BM25", "params": {}}
        params = self._search_params(window)
        if min_score is not None:
            # Range search: Milvus skips what is below the threshold (a post-filter still
            # applies the exact, inclusive bound). L2 ranks by distance = -score.
            if self.settings.metric_type == "L2":
                if min_score < 0:
                    params["params"] = {**params["params"], "radius": -min_score + 1e-6}
            else:
                params["params"] = {**params["params"], "radius": min_score - 1e-6}
        return params

    def _hits(self, result: Any, leg_field: str | None, t: Tenancy) -> list[RawHit]:
        """Raw Milvus hits as similarities ("higher is better"); `leg_field` None: fused.
        Only the caller's tenant's hits, under the caller's ids (defence in depth: the
        filter already confined the search)."""
        def score(d: float) -> float:
            if leg_field == F.KEYWORD_SPARSE:
                # A BM25 score is >= 0; embedded Milvus Lite hands it back negated (best
                # first, most negative), a Milvus (Lite) server as is.
                return abs(float(d))
            return self._similarity(d) if leg_field in (F.IMAGE_VECTOR, F.CAPTION_VECTOR) else float(d)
        return [RawHit(t.unkey(h["id"]), score(h["distance"]),
                       {k: v for k, v in (h.get("entity") or {}).items() if k != F.TENANT})
                for h in result[0] if t.owns(h.get("entity") or {}, h["id"])]

    @staticmethod
    def _ranker(decay: DecaySpec) -> Function:
        return Function(
            name="decay", input_field_names=[decay.field], function_type=FunctionType.RERANK,
            params={"reranker": "decay", "function": decay.function, "origin": decay.origin, "scale": decay.scale,
                    "offset": decay.offset, "decay": decay.decay},
        )

    async def search(self, leg: LegQuery, top_k: int, offset: int, opts: SearchOptions) -> list[RawHit]:
        """One leg: a dense field with a vector, or the keyword field with text."""
        t = await self.tenancy()
        expr = self._leg_filter(leg.field, t.scope(opts.filter))
        output_fields = t.fields(opts.output_fields)
        # A decayed score is not the similarity: then the threshold is only a post-filter.
        ranged = opts.min_score if opts.decay is None and opts.group_by is None else None
        kwargs: dict[str, Any] = {}
        if opts.group_by is not None:
            kwargs.update(group_by_field=opts.group_by[0], group_size=opts.group_by[1])
        if opts.decay is not None:
            kwargs["ranker"] = self._ranker(opts.decay)

        def run(c: MilvusClient) -> Any:
            return c.search(
                self.collection, data=[leg.data], anns_field=leg.field, limit=top_k, offset=offset, filter=expr,
                output_fields=output_fields, search_params=self._leg_params(leg.field, offset + top_k, ranged),
                **kwargs,
            )

        hits = self._hits(await self._call("search", run, opts.filter), None if opts.decay else leg.field, t)
        return _at_least(hits, opts.min_score)

    async def hybrid_search(
        self, legs: Sequence[LegQuery], top_k: int, offset: int, opts: SearchOptions, rrf_k: int, weighted: bool,
    ) -> list[RawHit]:
        """Searches each leg and fuses them in Milvus (RRF, or weighted by each leg's weight)."""
        window = offset + top_k
        candidates = max(window, self.settings.hybrid_candidates)
        t = await self.tenancy()
        scoped, output_fields = t.scope(opts.filter), t.fields(opts.output_fields)
        kwargs: dict[str, Any] = {}
        if opts.group_by is not None:
            kwargs.update(group_by_field=opts.group_by[0], group_size=opts.group_by[1])

        def run(c: MilvusClient) -> Any:
            reqs = [AnnSearchRequest([leg.data], leg.field, self._leg_params(leg.field, candidates), limit=candidates,
                                     expr=self._leg_filter(leg.field, scoped) or None) for leg in legs]
            ranker = WeightedRanker(*(leg.weight for leg in legs)) if weighted else RRFRanker(rrf_k)
            return c.hybrid_search(self.collection, reqs, ranker, limit=window, output_fields=output_fields,
                                   **kwargs)

        # Fused scores are already "higher is better"; pagination is applied on the fused list.
        hits = self._hits(await self._call("hybrid_search", run, opts.filter), None, t)[offset:]
        return _at_least(hits, opts.min_score)

    async def iterate(self, leg: LegQuery, opts: SearchOptions, batch_size: int, limit: int) -> AsyncIterator[
            list[RawHit]]:
        """Every row matching the filter, ranked exactly by similarity to a dense vector, a
        batch at a time: beyond Search's offset + top_k window (deep pagination, export).

        Milvus' own search iterator is not used: on Milvus Lite (no iterator v2) it stopped
        at 5,001 of 20,000 rows, and range search (its v1 mechanism) returned 644 of 1,000
        rows in a band. So the scores are computed here from the stored vectors (one
        query_iterator pass, SEARCH_MAX_EXPORT_ROWS at most), sorted, and each batch's
        fields fetched by id: exact order, no duplicates, no gaps. Rows deleted during the
        export are left out.
        """
        if leg.field == F.KEYWORD_SPARSE:
            raise InvalidInput("SearchAll ranks by a vector (IMAGE or CAPTION target); the keyword leg pages only "
                               "within Search's window")
        t = await self.tenancy()
        expr = self._leg_filter(leg.field, t.scope(opts.filter)) or 'id != ""'
        scan_fields = t.fields(["id", leg.field])
        query = np.asarray(leg.data, dtype=np.float32)
        cap = self.settings.max_export_rows

        def scan(c: MilvusClient) -> tuple[list[str], np.ndarray]:
            it = c.query_iterator(self.collection, batch_size=2000, filter=expr, output_fields=scan_fields)
            ids: list[str] = []  # stored keys
            parts: list[np.ndarray] = []
            try:
                while batch := it.next():
                    batch = [r for r in batch if t.owns(r)]
                    if not batch:
                        continue
                    ids += [r["id"] for r in batch]
                    parts.append(self._scores(query, np.asarray([r[leg.field] for r in batch], dtype=np.float32)))
                    if len(ids) > cap:
                        raise InvalidInput(f"more than SEARCH_MAX_EXPORT_ROWS ({cap}) rows match: narrow the filter "
                                           "or set a limit")
            finally:
                it.close()
            return ids, np.concatenate(parts) if parts else np.zeros(0, np.float32)

        ids, scores = await self._call("query_iterator", scan, opts.filter)
        if opts.min_score is not None:
            keep = np.flatnonzero(scores >= opts.min_score)
            ids, scores = [ids[i] for i in keep], scores[keep]
        # Best first; ties in id order so that repeated exports agree.
        order = np.lexsort((np.asarray(ids, dtype=object), -scores)) if ids else np.zeros(0, np.int64)
        if limit > 0:
            order = order[:limit]
        for start in range(0, len(order), batch_size):
            chunk = [ids[i] for i in order[start : start + batch_size]]
            fields = t.fields(opts.output_fields or ["id"])
            rows = await self._call("get", lambda c, chunk=chunk, fields=fields: c.get(
                self.collection, ids=chunk, output_fields=fields))
            by_id = {r["id"]: r for r in rows if t.owns(r)}
            yield [RawHit(t.unkey(i), float(scores[j]), {k: v for k, v in by_id[i].items() if k not in ("id", F.TENANT)})
                   for i, j in zip(chunk, order[start : start + batch_size], strict=True) if i in by_id]

    def _scores(self, query: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """Similarities as Search reports them ("higher is better") for this metric."""
        metric = self.settings.metric_type
        if metric == "L2":
            return -np.linalg.norm(vectors - query, axis=1)
        dots = vectors @ query
        if metric == "IP":
            return dots
        norms = np.linalg.norm(vectors, axis=1) * max(float(np.linalg.norm(query)), 1e-12)
        return dots / np.maximum(norms, 1e-12)


def _at_least(hits: list[RawHit], min_score: float | None) -> list[RawHit]:
    """Hits come best first, so the threshold cuts a prefix off the list."""
    return hits if min_score is None else [h for h in hits if h.score >= min_score]


def keyword_text(caption: str, keywords: Sequence[str]) -> str:
    """What the keyword leg indexes: the caption and its keywords."""
    return " ".join([caption, *keywords])[: F.MAX_KEYWORD_TEXT_CHARS]


def format_indexed(fields: dict[str, str]) -> str:
    return ",".join(f"{name}:{kind}" for name, kind in fields.items())


def _fits(value: Any, kind: str) -> bool:
    if kind == "string":
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):  # JSON true is not a number here
        return False
    if kind == "int":
        return isinstance(value, int) and -(2**63) <= value < 2**63
    return isinstance(value, int | float) and math.isfinite(value)
