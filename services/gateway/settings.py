"""Gateway settings (environment prefix GATEWAY_), the same conventions as the gRPC services.

Nested fields use `__`, e.g. `GATEWAY_SEARCH_TLS__CA_FILE`; docs/configuration.md lists
every variable with its default.
"""
from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.settings import ClientTlsSettings, ImageLimits, MiB


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", env_nested_delimiter="__", extra="ignore")

    host: str = "0.0.0.0"
    http_port: int = 8080
    # Prometheus /metrics on its own port like every other service; 0 picks a free port,
    # -1 disables it.
    metrics_port: int = 9103
    log_level: str = "INFO"
    log_json: bool = True
    # On SIGTERM: /readyz turns 503 at once, then requests in flight get this long.
    shutdown_grace_s: float = 20.0

    # --- the search service it calls ----------------------------------------------------
    search_target: str = "127.0.0.1:50050"
    search_tls: ClientTlsSettings = Field(default_factory=ClientTlsSettings)
    # Deadline of each unary call (Search, Get, Delete, Stats) toward search.
    search_timeout_s: float = 30.0
    # Deadline of streaming calls (Ingest, Backfill, SearchAll); 0: none (the caller's
    # connection bounds them).
    stream_timeout_s: float = 0.0
    # Largest gRPC message to and from search (an image inline in a request).
    max_message_bytes: int = 64 * MiB

    # --- request bounds (413 beyond them) -----------------------------------------------
    # A JSON body (base64 images inline: 4/3 of the image bytes), and each NDJSON line of
    # an ingest stream (the stream itself has no total bound: it is streamed through).
    max_body_bytes: int = 32 * MiB
    # A whole multipart upload, and the number of files in it.
    max_upload_bytes: int = 256 * MiB
    max_upload_files: int = 1000

    # --- thumbnails ----------------------------------------------------------------------
    # Stored items whose uri is file:// under this folder get thumbnails (the same rules as
    # search's SEARCH_URIS__FILE_ROOT: no '..', no symlink out of it); unset: none.
    file_root: Path | None = None
    # Longest side of a thumbnail, in pixels (a request may ask for less).
    thumbnail_max_px: int = 384
    # Browser cache lifetime of a thumbnail (private: it is fetched with the caller's token).
    thumbnail_cache_s: int = 300
    # Bounds on the stored files a thumbnail decodes (decompression bombs).
    images: ImageLimits = Field(default_factory=ImageLimits)

    # Serve the search page at / (the API and /docs stay either way).
    page: bool = True
