"""Typed configuration of the captioner, read from `CAPTIONER_*` environment variables.

docs/captioner.md lists every variable. Nested fields use `__`, e.g.
`CAPTIONER_RETRY__MAX_ATTEMPTS=5` (the same `RetrySettings` group as the embedder's
`EMBEDDER_DASHSCOPE__RETRY__*`; conventions at the top of services/common/settings.py).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import RetrySettings, ServerSettings, vendor_dashscope_api_key

Backend = Literal["lite", "dashscope", "openai"]
LanguageCode = Literal["en", "zh"]

#: The Alibaba/Qwen tutorial's prompt; `{max_words}` is filled with the word limit (50 gives
#: the tutorial's exact text).
DEFAULT_PROMPT = "First, describe this image in under {max_words} words, and then provide 5 keywords"
DEFAULT_PROMPT_ZH = "首先，用不超过{max_words}个词描述这张图片，然后给出5个关键词"

#: The model each backend uses when `CAPTIONER_MODEL` is empty.
DEFAULT_MODELS: dict[str, str] = {
    "dashscope": "qwen-vl-plus",
    "openai": "Qwen/Qwen2.5-VL-7B-Instruct",
    "lite": "efficientnet-lite0-imagenet1k",
}


class CaptionerSettings(ServerSettings):
    model_config = SettingsConfigDict(env_prefix="CAPTIONER_", env_nested_delimiter="__", extra="ignore")

    grpc_port: int = 50052
    metrics_port: int = 9102

    # --- backend --------------------------------------------------------------------
    backend: Backend = "lite"
    # Model name sent upstream; empty means the backend's default (see DEFAULT_MODELS).
    # The lite backend has exactly one model and ignores it.
    model: str = ""
    # DashScope / OpenAI-compatible API key. Never logged. For dashscope, empty falls back
    # to the SDK's own DASHSCOPE_API_KEY variable; for openai, empty sends a placeholder
    # (vLLM without --api-key accepts anything).
    api_key: SecretStr | None = None
    # dashscope: the SDK's HTTP base URL (default https://dashscope.aliyuncs.com/api/v1;
    # https://dashscope-intl.aliyuncs.com/api/v1 for the international region).
    # openai: the OpenAI-compatible base URL, e.g. http://vllm:8000/v1.
    base_url: str | None = None

    # --- prompt ---------------------------------------------------------------------
    default_prompt: str = DEFAULT_PROMPT
    default_prompt_zh: str = DEFAULT_PROMPT_ZH
    default_language: LanguageCode = "en"
    default_max_words: int = Field(default=50, ge=1)
    # Requests asking for more words than this are INVALID_ARGUMENT.
    max_words_limit: int = Field(default=300, ge=1)
    max_prompt_chars: int = Field(default=2000, ge=1)
    # Keywords kept from the model's answer (after de-duplication).
    max_keywords: int = Field(default=10, ge=1)
    # Upper bound on generated tokens (remote backends).
    max_output_tokens: int = Field(default=300, ge=16)
    temperature: float | None = None

    # --- upstream behaviour (services/common/upstream.py) -----------------------------
    retry: RetrySettings = Field(default_factory=RetrySettings)
    # Upstream calls in flight at once (model runs, for lite); more wait for a slot.
    max_concurrency: int = Field(default=8, ge=1)
    # Calls allowed to wait for a slot; beyond this a call is RESOURCE_EXHAUSTED at once.
    max_waiting: int = Field(default=256, ge=0)
    # One upstream HTTP attempt may take this long (a timeout is retried).
    request_timeout_s: float = Field(default=30.0, gt=0)
    # A whole caption (queueing, all attempts, backoff) may take this long; the caller's
    # gRPC deadline shortens it further.
    call_deadline_s: float = Field(default=60.0, gt=0)
    # Images are sent as-is when small enough in a format every VLM reads (JPEG/PNG/WebP);
    # otherwise re-encoded as JPEG with the long side at most this many pixels.
    upload_max_side_px: int = Field(default=1536, ge=64)
    upload_max_bytes: int = Field(default=7 * 1024 * 1024, ge=1024)

    # --- cache, batches -------------------------------------------------------------
    # LRU entries (one per image hash + prompt + language + max words + model); 0 disables.
    cache_size: int = Field(default=4096, ge=0)
    max_batch_items: int = Field(default=64, ge=1)

    # --- lite backend ---------------------------------------------------------------
    lite_top_k: int = Field(default=5, ge=1, le=20)
    # Labels less probable than this are not keywords (the top label always is).
    lite_min_keyword_prob: float = Field(default=0.02, ge=0.0, le=1.0)
    # Threads that run the model; >1 only helps with several idle cores.
    lite_threads: int = Field(default=1, ge=1)
    # What runs EfficientNet-Lite0: "torch", or "onnx" (ONNX Runtime) / "openvino", exported
    # from the same torch weights at first start and cached in MMSEARCH_CACHE_DIR (same
    # probabilities: cosine >= 0.9999 with torch).
    lite_runtime: Literal["torch", "onnx", "openvino"] = "onnx"

    @model_validator(mode="after")
    def _check(self) -> CaptionerSettings:
        if self.default_max_words > self.max_words_limit:
            raise ValueError("default_max_words must not exceed max_words_limit")
        if self.backend == "dashscope" and self.api_key is None:
            # The SDK's own variable (only for DashScope: never sent to another endpoint).
            self.api_key = vendor_dashscope_api_key()
        return self

    @property
    def model_name(self) -> str:
        """The model actually used: `model`, or the backend's default."""
        if self.backend == "lite":
            return DEFAULT_MODELS["lite"]
        return self.model or DEFAULT_MODELS[self.backend]
