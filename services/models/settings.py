"""Settings of the models process: `MODELS_*` for the process itself (host, ports, auth,
TLS, logs: every `ServerSettings` field, plus the shared class-probability cache).

The two contracts it serves keep their own settings and variables: `EMBEDDER_*` (e.g.
`EMBEDDER_LITE__TOP_T`, `EMBEDDER_MAX_BATCH_ITEMS`, `EMBEDDER_IMAGES__*`) and
`CAPTIONER_*` (e.g. `CAPTIONER_LITE_TOP_K`, `CAPTIONER_CACHE_SIZE`), read by
`EmbedderSettings` / `CaptionerSettings` as in their own processes; only their server
fields (host, ports, auth, TLS) are not used here. Both backends must be `lite`.
"""
from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServerSettings


class ModelsSettings(ServerSettings):
    model_config = SettingsConfigDict(env_prefix="MODELS_", env_nested_delimiter="__", extra="ignore")

    # The embedder's ports: the local suite runs this process instead of the embedder.
    grpc_port: int = 50051
    metrics_port: int = 9101

    # Class probabilities kept per image (SHA-256 of the encoded bytes), so the caption
    # and the image vector of one image cost one classifier forward; 4 KiB per entry.
    probs_cache_size: int = Field(default=512, ge=1)
