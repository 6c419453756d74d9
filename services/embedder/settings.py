"""Embedder settings: one typed object, read from `EMBEDDER_*` environment variables.

Nested groups use `__`, e.g. `EMBEDDER_DASHSCOPE__API_KEY`, `EMBEDDER_DASHSCOPE__RETRY__MAX_ATTEMPTS`
(the same `RetrySettings` group as the captioner's `CAPTIONER_RETRY__*`; conventions at the
top of services/common/settings.py). docs/embedder.md lists every variable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import MiB, RetrySettings, ServerSettings, shared_cache_dir, vendor_dashscope_api_key

BackendName = Literal["lite", "clip", "bge", "dashscope"]


class LiteSettings(BaseModel):
    """The offline CPU backend (EfficientNet-Lite0 + all-MiniLM-L6-v2 joined by ConSE)."""

    # ConSE: how many of the most probable ImageNet classes form an image's vector.
    top_t: int = Field(default=10, ge=1, le=1000)
    # Where the ConSE class vectors are cached (derived from the models, rebuilt when
    # missing). Unset: MMSEARCH_CACHE_DIR, else ~/.cache/mmsearch (shared with the CLI).
    cache_dir: Path | None = None
    # Vector dimension. Unset: MiniLM's native 384. Set (e.g. 128): every vector (text and
    # image, one space) goes through a fixed, seeded random orthonormal projection to this
    # many dimensions (Johnson-Lindenstrauss; the same matrix in every process), then is
    # L2-normalised; the model id gets `-d<dim>`, so its vectors never mix with native ones.
    dim: int | None = Field(default=None, ge=1, le=4096)
    # What runs the two networks on the CPU: "torch", or "onnx" (ONNX Runtime) / "openvino",
    # exported from the same torch weights at first start and cached in cache_dir (same
    # vectors: cosine >= 0.9999 with torch, same model id). EMBEDDER_TORCH_THREADS sets their
    # intra-op threads too. On a CUDA device the models run in torch whatever this says.
    runtime: Literal["torch", "onnx", "openvino"] = "onnx"

    @property
    def resolved_cache_dir(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else shared_cache_dir()


class BgeSettings(BaseModel):
    """Visualized BGE: needs `visual_bge` or `FlagEmbedding.visual` (<= 1.2.11), torchvision, timm.

    EMBEDDER_MODEL_DIR is the local directory of the BGE text model the weights belong to.
    """

    # Which Visualized BGE: it picks its EVA-CLIP vision tower by this name.
    model_name: Literal["bge-base-en-v1.5", "bge-m3"] = "bge-base-en-v1.5"
    # The Visualized BGE weight file, e.g. Visualized_base_en_v1.5.pth.
    weights_file: Path | None = None


class DashScopeSettings(BaseModel):
    """DashScope multimodal embeddings through the official `dashscope` SDK."""

    # Falls back to the SDK's standard DASHSCOPE_API_KEY variable when unset. Never logged.
    api_key: SecretStr | None = None
    # The SDK's base HTTP API URL (region endpoints differ; tests point it at a local server).
    base_url: str = "https://dashscope.aliyuncs.com/api/v1"
    model: str = "multimodal-embedding-v1"
    dimension: int = Field(default=1024, ge=1)
    # Per-call input limits of the model: batches are split to respect them.
    max_contents_per_call: int = Field(default=20, ge=1)
    max_images_per_call: int = Field(default=1, ge=1)
    # Images above this size (or in a format DashScope does not take) are re-encoded as JPEG.
    max_image_bytes: int = Field(default=3 * MiB, ge=1024)
    # HTTP calls in flight at once from this replica (the account's RPM is shared by all).
    max_concurrent_calls: int = Field(default=4, ge=1)
    # Timeout of one HTTP attempt; the caller's deadline shortens it.
    request_timeout_s: float = Field(default=30.0, gt=0)
    retry: RetrySettings = Field(default_factory=RetrySettings)

    @model_validator(mode="after")
    def _vendor_key(self) -> DashScopeSettings:
        if self.api_key is None:
            self.api_key = vendor_dashscope_api_key()
        return self


class EmbedderSettings(ServerSettings):
    model_config = SettingsConfigDict(env_prefix="EMBEDDER_", env_nested_delimiter="__", extra="ignore")

    grpc_port: int = 50051
    metrics_port: int = 9101

    backend: BackendName = "lite"
    # Overrides the model id reported in Info / EmbedResponse (default: derived from the model).
    model_id: str | None = None

    # --- limits and dynamic batching ---------------------------------------------------
    # Most items one Embed call may carry.
    max_batch_items: int = Field(default=64, ge=1)
    # Most items merged into one model forward (or one upstream batch).
    max_model_batch_size: int = Field(default=32, ge=1)
    # How long the first item of a partial batch waits for company while the model is idle.
    # 0 (default): an idle model starts at once; under load batches still grow, because
    # calls queue up while the previous batch computes. A few ms helps big GPU models.
    max_queue_delay_ms: float = Field(default=0.0, ge=0)
    # After a batch that answered several calls, how long a partial next batch waits for
    # those callers' next requests. Helps closed-loop callers (each sends its next call when
    # answered), which otherwise split into two half-size batches for good: 32 such clients
    # on the CPU lite model went from batches of ~16 to ~30 and +10% items/s at 20 ms
    # (docs/embedder.md). It idles the model for open-loop traffic, hence off by default.
    # A lone caller never waits.
    batch_regather_ms: float = Field(default=0.0, ge=0)
    # Model items admitted but not yet in a model batch (decoding, preprocessing or queued);
    # a composed item counts two (image + instruction) unless the model composes natively.
    # Beyond it calls fail at once with RESOURCE_EXHAUSTED.
    max_queue_items: int = Field(default=1024, ge=1)
    # Threads that decode and preprocess images off the model thread.
    preprocess_workers: int = Field(default=2, ge=1)
    # Longest accepted text (and composed instruction), in characters.
    max_text_chars: int = Field(default=2048, ge=1)
    # Instruction weight for composed items that leave it 0 (mixing backends only).
    composed_instruction_weight: float = Field(default=0.5, ge=0.0, le=1.0)
    # Consecutive unexpected model errors after which health turns NOT_SERVING.
    fatal_error_threshold: int = Field(default=3, ge=1)

    # --- local models ----------------------------------------------------------------------
    # Weights directory (a volume in Kubernetes): the CLIP / SigLIP checkpoint for "clip",
    # the BGE text model for "bge".
    model_dir: Path | None = None
    # "auto": cuda when available, else cpu. Or "cpu", "cuda", "cuda:1", ...
    device: str = "auto"
    # "auto": float16 on CUDA, float32 on CPU.
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    # torch intra-op threads (process-wide); unset keeps torch's default.
    torch_threads: int | None = Field(default=None, ge=1)
    # Local forwards that may run at once, each on its own thread. 1 for a GPU (its stream
    # serialises them anyway). On a CPU, 2 forwards each on half the cores keep both busy
    # while the other waits on decode and preprocess: the local suite's models process
    # runs 2 (docs/benchmarks.md, "Ingest against a single-process peer").
    model_threads: int = Field(default=1, ge=1)

    lite: LiteSettings = Field(default_factory=LiteSettings)
    bge: BgeSettings = Field(default_factory=BgeSettings)
    dashscope: DashScopeSettings = Field(default_factory=DashScopeSettings)

    @model_validator(mode="after")
    def _check_bounds(self) -> EmbedderSettings:
        if 2 * self.max_batch_items > self.max_queue_items:
            raise ValueError(
                f"max_queue_items ({self.max_queue_items}) must be at least 2 x max_batch_items"
                f" ({self.max_batch_items}): a full call of composed items could never be admitted"
            )
        return self

    @property
    def max_queue_delay_s(self) -> float:
        return self.max_queue_delay_ms / 1000.0
