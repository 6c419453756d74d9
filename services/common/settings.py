"""Typed settings shared by every service, read from environment variables.

One convention for every service (search, embedder, captioner, gateway):

- Each service subclasses `ServerSettings` (the gateway: `BaseSettings` with the same
  config) with its own `env_prefix` (`SEARCH_`, `EMBEDDER_`, `CAPTIONER_`, `GATEWAY_`)
  and `env_nested_delimiter="__"`, so one container image runs anywhere by environment
  alone (12-factor).
- A group of related settings that belongs together (and that more than one service
  has, or that a service has more than once) is a nested model, named once here and
  read the same way everywhere: `TLS__` (`TlsSettings`), `IMAGES__` (`ImageLimits`),
  `URIS__` (`UriSettings`), `RETRY__` (`RetrySettings`, every remote upstream), a
  client's `..._TLS__` (`ClientTlsSettings`), and a backend's own knobs under its name
  (`EMBEDDER_DASHSCOPE__...`, `EMBEDDER_LITE__...`). Single knobs stay flat.
- Nothing outside a settings module reads the environment. The only variables read
  without a service prefix are the vendor SDK's `DASHSCOPE_API_KEY` (a fallback for an
  unset DashScope API key field) and `MMSEARCH_CACHE_DIR` (derived model data shared
  with the CLI), both read here (`vendor_dashscope_api_key`, `shared_cache_dir`).
- A renamed variable keeps its old name working (`AliasChoices`).
- Flat groups that predate this convention stay flat rather than break deployments:
  search's `MILVUS_*`, `EMBEDDER_TARGET` / `CAPTIONER_TARGET` / `UPSTREAM_*`, `HNSW_*`,
  `IVF_*`; the captioner's one remote upstream (`API_KEY`, `BASE_URL`, `MODEL`,
  `REQUEST_TIMEOUT_S`, `MAX_CONCURRENCY`, `UPLOAD_*`) and `LITE_*`. New groups nest.

docs/configuration.md lists every variable.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MiB = 1024 * 1024


def vendor_dashscope_api_key() -> SecretStr | None:
    """The DashScope SDK's own `DASHSCOPE_API_KEY` (fallback for unset API key fields)."""
    value = os.environ.get("DASHSCOPE_API_KEY")
    return SecretStr(value) if value else None


def shared_cache_dir() -> Path:
    """`MMSEARCH_CACHE_DIR`, else ~/.cache/mmsearch: derived model data (ConSE class vectors)."""
    value = os.environ.get("MMSEARCH_CACHE_DIR")
    return Path(value) if value else Path.home() / ".cache" / "mmsearch"


class RetrySettings(BaseModel):
    """Retries of one remote upstream call (`services/common/upstream.py`): exponential
    backoff with full jitter, bounded by attempts and by a time budget that the caller's
    deadline shortens. Nested as `RETRY__` wherever a service calls a remote API."""

    max_attempts: int = Field(default=4, ge=1)
    initial_backoff_s: float = Field(default=0.2, ge=0)
    max_backoff_s: float = Field(default=5.0, ge=0)
    # Total time for all attempts of one call; also capped by the caller's deadline.
    budget_s: float = Field(default=30.0, gt=0)


class TlsSettings(BaseModel):
    """Server-side TLS. All empty: plaintext (loopback / inside a service mesh)."""

    cert_file: Path | None = None
    key_file: Path | None = None
    # When set, clients must present a certificate signed by this CA (mTLS).
    client_ca_file: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None and self.key_file is not None


class ClientTlsSettings(BaseModel):
    """How this service dials another one (search -> embedder / captioner)."""

    # CA bundle that signed the server's certificate; empty with `enabled` uses system roots.
    enabled: bool = False
    ca_file: Path | None = None
    # Client certificate for mTLS.
    cert_file: Path | None = None
    key_file: Path | None = None
    # Overrides the name checked against the server certificate (tests, IP targets).
    server_name_override: str | None = None


class ImageLimits(BaseModel):
    """Bounds on image intake; they defeat oversize payloads and decompression bombs."""

    max_bytes: int = 20 * MiB
    # The only pixel limit that applies (Pillow's own MAX_IMAGE_PIXELS is switched off):
    # checked from the header before any pixel is decoded.
    max_pixels: int = 40_000_000
    # Decode only as many pixels as the model needs: JPEG draft mode (1/2..1/8 scale in
    # the DCT) and Pillow's `reduce` before the RGB copy. Off: full-size decodes (the
    # baseline bench/image_memory.py compares against).
    reduce_on_decode: bool = True
    # Pixels that may be decoding at once in this process (all threads): a near-limit
    # image waits while others hold the budget, which bounds peak memory under many
    # concurrent large images. Unset: `max_pixels` (one image at the limit at a time);
    # 0: no bound.
    max_decoding_pixels: int | None = None
    allowed_formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO")


class UriSettings(BaseModel):
    """Bounds on images given by URI (see `uris.py`)."""

    # `file://` URIs must resolve inside this folder; unset: file URIs are refused.
    file_root: Path | None = None
    # Remote fetching is off by default (SSRF); even when on, private ranges are refused.
    allow_http: bool = False
    # Connect, and each wait for the next bytes: a server that sends nothing.
    http_timeout_s: float = 10.0
    # The whole fetch (every redirect hop, connect + headers + body): a server that sends
    # a byte now and then is cut off here at the latest.
    http_total_budget_s: float = 20.0
    # After the first `http_min_rate_grace_s`, a fetch slower than this on average is cut
    # off at once instead of holding a slot until the total budget.
    http_min_bytes_per_s: int = 16_384
    http_min_rate_grace_s: float = 2.0
    max_redirects: int = 3
    # Networks exempted from the private-address ban (CIDR, e.g. "127.0.0.1/32" in tests
    # or an internal image CDN). Every redirect hop is checked again.
    http_allowed_networks: list[str] = Field(default_factory=list)


class ServerSettings(BaseSettings):
    """What every gRPC server needs. Nested fields use `__`, e.g. `SEARCH_TLS__CERT_FILE`."""

    model_config = SettingsConfigDict(env_nested_delimiter="__", extra="ignore")

    host: str = "0.0.0.0"
    grpc_port: int = 50051
    # Prometheus /metrics on its own port; 0 picks a free port, -1 disables it.
    metrics_port: int = 9100
    max_receive_message_bytes: int = 64 * MiB
    max_send_message_bytes: int = 64 * MiB
    # Calls in flight beyond this are refused with RESOURCE_EXHAUSTED by grpc itself.
    max_concurrent_rpcs: int | None = None
    # On SIGTERM: health turns NOT_SERVING, then in-flight calls get this long to finish.
    shutdown_grace_s: float = 20.0
    # Connections are closed after this age so clients rebalance onto new replicas.
    max_connection_age_s: int = 300
    # How long calls already running on an aged connection may go on (new calls use a new
    # connection at once). Unset: until they finish, so a long Ingest stream is never cut
    # by ageing (with a bound, it ended UNAVAILABLE "max connection age" mid-stream).
    max_connection_age_grace_s: float | None = None
    # Fix glibc's mmap threshold at 1 MiB so freed image buffers leave the process
    # (services/common/memory.py); off only to compare (bench/image_memory.py).
    return_freed_memory: bool = True
    log_level: str = "INFO"
    log_json: bool = True
    tls: TlsSettings = Field(default_factory=TlsSettings)
    # Bearer tokens accepted by the auth interceptor; empty disables auth. Comma separated
    # in the environment (e.g. from a Kubernetes secret), compared in constant time.
    auth_tokens: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    # Scoped tokens (tenant + scopes, SHA-256 hashes only) and mTLS client identities from a
    # YAML / JSON file, re-read within a second of a change (services/common/tokens.py,
    # docs/security.md). Set: every call needs a token from it or from `auth_tokens`.
    auth_token_file: Path | None = None
    # Per-tenant call counts (mmsearch_tenant_calls_total{tenant}): one series per tenant,
    # so off by default (label cardinality).
    tenant_metrics: bool = False
    images: ImageLimits = Field(default_factory=ImageLimits)
    uris: UriSettings = Field(default_factory=UriSettings)

    @field_validator("auth_tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [t.strip() for t in value.split(",") if t.strip()]
        return value
