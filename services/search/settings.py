"""Search service settings (environment prefix SEARCH_)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from services.common.settings import ClientTlsSettings, ServerSettings

# Types an indexed metadata field may have, and the collection's own field names.
INDEXED_TYPES = {"string", "int", "float", "bool"}
RESERVED_FIELDS = {
    "id", "content_sha256", "fingerprint", "uri", "caption", "keywords", "metadata", "embedder_model_id",
    "captioner_model_id", "ingested_at_ms", "ingested_at", "caption_pending", "image_vector", "caption_vector",
    "keyword_text", "keyword_sparse", "tenant",
}


def parse_indexed_fields(text: str) -> dict[str, str]:
    """ "name:type,..." (the setting, and the collection property that records it) -> dict;
    a name without a type maps to "" (refused by the settings validator)."""
    pairs = [p.strip() for p in text.split(",") if p.strip()]
    return dict(tuple(p.split(":", 1)) if ":" in p else (p, "") for p in pairs)


def parse_model_embedders(text: str) -> dict[str, str]:
    """ "model-id=host:port,..." -> {model id: embedder target}."""
    out: dict[str, str] = {}
    for pair in (p.strip() for p in text.split(",") if p.strip()):
        model, sep, target = pair.partition("=")
        if not sep or not model.strip() or not target.strip():
            raise ValueError(f"SEARCH_MODEL_EMBEDDERS entry {pair!r} is not 'model-id=host:port'")
        out[model.strip()] = target.strip()
    return out


class OriginalsSettings(BaseModel):
    """Where search keeps the original bytes of ingested images (services/search/originals.py):
    a model change re-embeds items ingested as inline bytes from here. Content-addressed
    (one object per SHA-256). Unset: no originals are kept (items given by URI are re-read
    from their URI)."""

    # A local folder (a laptop, one search process; in Kubernetes a ReadWriteMany volume).
    dir: Path | None = None
    # S3-compatible object storage (AWS S3, MinIO: the Milvus chart runs one).
    s3_endpoint: str = ""  # e.g. http://mmsearch-milvus-minio:9000; empty: AWS
    s3_bucket: str = ""
    s3_prefix: str = "mmsearch-originals/"
    s3_region: str = "us-east-1"
    s3_access_key: SecretStr | None = None
    s3_secret_key: SecretStr | None = None

    @property
    def enabled(self) -> bool:
        return self.dir is not None or bool(self.s3_bucket)


class SearchSettings(ServerSettings):
    model_config = SettingsConfigDict(env_prefix="SEARCH_", env_nested_delimiter="__", extra="ignore")

    grpc_port: int = 50050
    metrics_port: int = 9100

    # --- Milvus -------------------------------------------------------------------
    # A file path (embedded Milvus Lite) or a server address such as http://milvus:19530.
    milvus_uri: str = "./var/mmsearch.db"
    milvus_token: SecretStr | None = None
    # Milvus database (created by an administrator); empty: Milvus' "default" database.
    milvus_db_name: str = ""
    # TLS toward a Milvus server (its proxy with common.security.tlsMode 1 or 2). On with
    # `enabled` or an https:// URI; `ca_file` verifies the server (system roots if unset),
    # `cert_file` + `key_file` (with `ca_file`) add a client certificate for tlsMode 2.
    milvus_tls: ClientTlsSettings = Field(default_factory=ClientTlsSettings)
    collection: str = "mmsearch"
    index_type: Literal["HNSW", "IVF_FLAT", "FLAT", "AUTOINDEX"] = "HNSW"
    metric_type: Literal["COSINE", "IP", "L2"] = "COSINE"
    hnsw_m: int = 16
    hnsw_ef_construction: int = 200
    # Search-time candidate list; raised to offset + top_k when that is larger.
    hnsw_ef: int = 128
    ivf_nlist: int = 1024
    ivf_nprobe: int = 32
    milvus_timeout_s: float = 10.0
    milvus_threads: int = 8
    # When search flushes a collection in the background (services/search/flushing.py):
    # after an Ingest stream ends with at least `flush_min_rows` unflushed rows; after
    # `flush_idle_s` with unflushed rows and no new write; as soon as `flush_max_rows` are
    # unflushed (a long stream: its rows are sealed and indexed while it still writes, so the
    # search after it scans and waits for at most this many; 2,000 rows of 384-d vectors
    # are ~8.6 MB segments, which embedded Milvus Lite merges four at a time and re-indexes
    # in the background; 5,000 made the last merge land at the stream's end: docs/benchmarks.md);
    # at most once per `flush_min_interval_s` per collection.
    # 0 or negative disables that trigger (all three: Milvus alone decides when to seal).
    flush_min_rows: int = 200
    flush_idle_s: float = 30.0
    flush_max_rows: int = 2000
    # None: 10 s against a Milvus server (its default per-collection flush rate limit,
    # quotaAndLimits.flushRate.collection.max 0.1), 1 s on embedded Milvus Lite (no such
    # limit; a stream's last rows then wait ~1 s, not up to 10, behind a max_rows flush).
    flush_min_interval_s: float | None = Field(default=None, ge=0)

    @property
    def milvus_mode(self) -> Literal["server", "embedded"]:
        """A URI (`http://...`) is a Milvus server; a file path is embedded Milvus Lite."""
        return "server" if "://" in self.milvus_uri else "embedded"

    def flush_interval_s(self) -> float:
        """`flush_min_interval_s`, or its default for this Milvus (see above)."""
        if self.flush_min_interval_s is not None:
            return self.flush_min_interval_s
        return 10.0 if self.milvus_mode == "server" else 1.0

    # --- upstream services ------------------------------------------------------------
    embedder_target: str = "127.0.0.1:50051"
    # More embedders, by the model they serve, as "model-id=host:port,...": during a model
    # change the candidate collection's model (docs/operations.md, "Change the embedding
    # model"). The embedder at `embedder_target` serves whatever model it reports.
    model_embedders: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    captioner_target: str = "127.0.0.1:50052"
    upstream_tls: ClientTlsSettings = Field(default_factory=ClientTlsSettings)
    # Per-call timeout toward the embedder / captioner (also capped by the caller's deadline).
    upstream_timeout_s: float = 60.0
    # gRPC-level attempts on UNAVAILABLE and CANCELLED (exponential backoff with jitter), per call.
    upstream_attempts: int = 4
    # Search never waits for the embedder to serve: at start-up it gives an embedder that
    # is already up this long to be bound (model guard) before health turns SERVING, then
    # serves Milvus-only calls and keeps binding in the background, however late it is.
    embedder_start_wait_s: float = 5.0

    # --- ingest pipeline --------------------------------------------------------------
    decode_workers: int = 4
    # Search keeps no pixels: it checks each image's header (size, format, declared pixels)
    # and leaves decoding to the captioner and the embedder, which refuse a corrupt body.
    # True: also decode every image here (the pre-0.2 path; bench/search_ingest.py --compare).
    decode_on_ingest: bool = False
    caption_concurrency: int = 8
    embed_batch_items: int = 16  # images per Embed call (each adds its caption: 2 items)
    upsert_batch_items: int = 64
    batch_wait_ms: float = 20.0
    # While captions are still being made, the embed stage keeps filling its batch for up
    # to this long after its first item (fewer, fuller Embed calls when captioning is the
    # slow stage); 0 = just batch_wait_ms.
    embed_batch_max_wait_ms: float = 2000.0
    # Items received but not yet decided, per Ingest call; the stream is not read further.
    max_in_flight_items: int = 256
    max_metadata_bytes: int = 64 * 1024
    # What Ingest does with an item whose captioning fails after the captioner's (and
    # gRPC's) retries: "fail" (FAILED, retryable) or "defer" (stored with its image
    # vector and `caption_pending`, outcome DEFERRED; `Backfill` captions it later).
    on_caption_failure: Literal["fail", "defer"] = "fail"
    # Where deferred items' image bytes are kept for the backfill (see pending.py);
    # unset: only items given by URI can be backfilled, others by re-ingesting them.
    pending_images_dir: Path | None = None
    # The backfill's pace ceiling (items started per second); callers may ask for less.
    backfill_max_items_per_s: float = 10.0
    max_metadata_depth: int = 8

    # --- search -------------------------------------------------------------------------
    max_top_k: int = 1000
    # Milvus' own bound on offset + limit.
    max_window: int = 16384
    max_filter_chars: int = 2048
    # Candidates each vector field contributes to hybrid fusion. Fixed (not derived from
    # offset + top_k) so that pages of a hybrid ranking concatenate exactly; pages beyond
    # it are computed with a larger window.
    hybrid_candidates: int = 256
    max_concurrent_searches: int = 64
    max_waiting_searches: int = 256
    # Examples per multi-example query.
    max_examples: int = 8
    # SearchAll streams at once; more are refused (RESOURCE_EXHAUSTED).
    max_concurrent_exports: int = 4
    # Rows one SearchAll may rank (it holds an id and a score per row: ~100 MB a million).
    max_export_rows: int = 1_000_000
    # The keyword (BM25) leg's analyzer, as Milvus takes it (JSON in the environment).
    # Chinese captions: {"tokenizer": "jieba"} on embedded Milvus Lite (needs the `jieba`
    # package), {"type": "chinese"} on a Milvus server. Read when a collection is created.
    keyword_analyzer: dict[str, Any] = Field(default_factory=lambda: {"type": "standard"})
    # Metadata keys copied into typed, indexed columns of new collections, as
    # "name:type,..." (types: string, int, float, bool): usable in filters
    # (`label in ["cat", "dog"]`), grouping and decay. Read when a collection is created;
    # an existing collection keeps the fields it was created with.
    indexed_fields: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)

    originals: OriginalsSettings = Field(default_factory=OriginalsSettings)

    @field_validator("model_embedders", mode="before")
    @classmethod
    def _parse_model_embedders(cls, value: Any) -> Any:
        return parse_model_embedders(value) if isinstance(value, str) else value

    @field_validator("indexed_fields", mode="before")
    @classmethod
    def _parse_indexed_fields(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = parse_indexed_fields(value)
        for name, kind in dict(value).items():
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,63}", name) or name in RESERVED_FIELDS:
                raise ValueError(f"indexed field name {name!r} is invalid or reserved (a letter, then letters, "
                                 f"digits, _; not one of {sorted(RESERVED_FIELDS)})")
            if kind not in INDEXED_TYPES:
                raise ValueError(f"indexed field {name!r} has type {kind!r}; use one of {sorted(INDEXED_TYPES)}")
        return value

    @model_validator(mode="after")
    def _milvus_tls_complete(self) -> SearchSettings:
        # pymilvus uses a client certificate only together with a CA file, and ignores a
        # lone certificate or key without a word: refuse such settings at start-up instead.
        tls = self.milvus_tls
        if (tls.cert_file is None) != (tls.key_file is None):
            raise ValueError("SEARCH_MILVUS_TLS__CERT_FILE and SEARCH_MILVUS_TLS__KEY_FILE go together")
        if tls.cert_file is not None and tls.ca_file is None:
            raise ValueError("SEARCH_MILVUS_TLS__CERT_FILE (a client certificate) needs SEARCH_MILVUS_TLS__CA_FILE")
        return self
