"""DashScope `multimodal-embedding-v1` through the official `dashscope` SDK.

Texts go as `{"text": ...}` contents, images as base64 data URIs `{"image": "data:..."}`
(as in the Alibaba Cloud tutorial), so no image ever needs a public URL. Batches from
the dynamic batcher are split to the model's per-call limits (contents per call,
images per call) and the calls run concurrently, bounded per replica.

Each call goes through the shared upstream kit (services/common/upstream.py): errors are
classified by DashScope's code and HTTP status; 429, 5xx and network errors are retried
with exponential backoff and full jitter within a budget that never outlives the
caller's deadline; the API key (settings, a Kubernetes secret) is scrubbed from any
upstream message we log or return.

SDK detail: the SDK treats any content string that names an existing local file as a
file to upload to DashScope's OSS. A text such as "/etc/passwd" would leak that file, so
the call goes through a subclass that switches that upload step off.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import numpy as np
from dashscope.embeddings.multimodal_embedding import AioMultiModalEmbedding

from services.common.deadline import Deadline
from services.common.images import DecodedImage, PixelNeed
from services.common.log import get_logger
from services.common.upstream import (
    DASHSCOPE_EMBEDDING_FORMATS,
    UpstreamCaller,
    UpstreamError,
    UpstreamObserver,
    dashscope_kind,
    data_uri,
    reencode_for_upload,
)
from services.embedder.backends.base import BackendInfo, Modality, RemoteBackend, l2_normalize
from services.embedder.metrics import UPSTREAM_REQUESTS
from services.embedder.settings import DashScopeSettings, EmbedderSettings

log = get_logger(__name__)


class _NoUploadEmbedding(AioMultiModalEmbedding):
    """The SDK call without its local-file upload step (see the module docstring)."""

    @classmethod
    def _preprocess_message_inputs(cls, model: str, input_data: Any, api_key: str) -> bool:
        return False


class _RequestMetrics(UpstreamObserver):
    """embedder_upstream_requests_total{outcome}: one sample per HTTP attempt."""

    def attempt_outcome(self, error: UpstreamError | None) -> None:
        UPSTREAM_REQUESTS.labels(_outcome(error)).inc()


def _outcome(error: UpstreamError | None) -> str:
    if error is None:
        return "ok"
    if error.kind == "malformed":
        return "bad_response"
    if error.status is None:
        return "network_error"
    if error.status == 429 or error.kind == "rate_limited":
        return "throttled"
    if error.status >= 500:
        return "server_error"
    return "client_error"


class DashScopeBackend(RemoteBackend):
    name = "dashscope"

    def __init__(self, settings: DashScopeSettings, model_id: str | None = None) -> None:
        self.settings = settings
        self.max_in_flight = settings.max_concurrent_calls
        self._model_id = model_id or f"dashscope:{settings.model}"
        self._session: aiohttp.ClientSession | None = None
        # The settings fall back to the SDK's own DASHSCOPE_API_KEY variable.
        self._api_key = settings.api_key.get_secret_value() if settings.api_key else None
        self.upstream = UpstreamCaller(
            self.name,
            settings.retry,
            max_concurrency=settings.max_concurrent_calls,
            request_timeout_s=settings.request_timeout_s,
            secrets=[self._api_key],
            observer=_RequestMetrics(),
        )

    @classmethod
    def from_settings(cls, settings: EmbedderSettings) -> DashScopeBackend:
        return cls(settings.dashscope, settings.model_id)

    @property
    def info(self) -> BackendInfo:
        return BackendInfo(self.name, self._model_id, self.settings.dimension, (Modality.TEXT, Modality.IMAGE), False)

    async def start(self) -> None:
        key = self.settings.api_key.get_secret_value() if self.settings.api_key else None
        if not key:
            raise RuntimeError(
                "the dashscope backend needs an API key: set EMBEDDER_DASHSCOPE__API_KEY (or DASHSCOPE_API_KEY)"
            )
        self._api_key = key
        self.upstream.secrets = (key,)
        # Our own session: pooled connections on the serving loop, closed on shutdown.
        self._session = aiohttp.ClientSession()
        log.info("dashscope backend ready", base_url=self.settings.base_url, model=self.settings.model)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- preprocessing (worker pool) ------------------------------------------------------

    @property
    def pixel_need(self) -> PixelNeed:
        # Small files go up as they are; larger ones are re-encoded, and the service scales
        # images down far below 2048 px anyway.
        return PixelNeed(long_side=2048)

    def preprocess_image(self, image: DecodedImage, data: bytes) -> str:
        """A data URI DashScope accepts: the original bytes when possible, else a JPEG under the limit."""
        payload, mime = reencode_for_upload(
            image, data, max_bytes=self.settings.max_image_bytes, formats=DASHSCOPE_EMBEDDING_FORMATS
        )
        return data_uri(payload, mime)

    # --- calls --------------------------------------------------------------------------------

    def _chunks(self, modality: Modality, batch: list[str]) -> list[list[dict[str, str]]]:
        key = "text" if modality is Modality.TEXT else "image"
        per_call = self.settings.max_contents_per_call
        if modality is Modality.IMAGE:
            per_call = min(per_call, self.settings.max_images_per_call)
        contents = [{key: value} for value in batch]
        return [contents[i : i + per_call] for i in range(0, len(contents), per_call)]

    async def aforward(self, modality: Modality, batch: list[Any], deadline: Deadline) -> np.ndarray:
        if modality is Modality.COMPOSED:
            raise ValueError("dashscope composes from image and text vectors")
        chunks = self._chunks(modality, list(batch))
        tasks = [asyncio.ensure_future(self._call(chunk, deadline)) for chunk in chunks]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:  # one chunk failed: the batch fails, stop spending calls
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return l2_normalize(np.concatenate(results))

    async def _call(self, contents: list[dict[str, str]], deadline: Deadline) -> np.ndarray:
        return await self.upstream.call(lambda timeout_s: self._call_once(contents, timeout_s), deadline)

    async def _call_once(self, contents: list[dict[str, str]], timeout_s: float) -> np.ndarray:
        """One HTTP attempt; raises `UpstreamError` (the kit retries and maps it)."""
        try:
            response = await _NoUploadEmbedding.call(
                model=self.settings.model,
                input=[dict(c) for c in contents],  # the SDK may rewrite items in place
                api_key=self._api_key,
                base_address=self.settings.base_url,
                session=self._session,
                request_timeout=timeout_s,
            )
        except (TimeoutError, aiohttp.ServerTimeoutError) as e:
            raise UpstreamError("timeout", f"no answer within {timeout_s:.1f}s ({type(e).__name__})") from None
        except (aiohttp.ClientError, OSError) as e:
            raise UpstreamError("connection", f"{type(e).__name__}: {e}") from None
        status = int(response.status_code)
        if status != 200:
            code = str(response.code or "") or None
            request_id = getattr(response, "request_id", "") or ""
            message = f"{response.message or '(no message)'} (request_id={request_id})"
            raise UpstreamError(dashscope_kind(status, code), message, status=status, code=code)
        try:
            rows = sorted(response.output["embeddings"], key=lambda r: int(r["index"]))
            vectors = np.asarray([r["embedding"] for r in rows], dtype=np.float32)
            if vectors.shape != (len(contents), self.settings.dimension):
                raise ValueError(f"got {vectors.shape}, expected ({len(contents)}, {self.settings.dimension})")
        except (KeyError, TypeError, ValueError) as e:
            raise UpstreamError("malformed", f"unexpected DashScope response: {e}") from None
        return vectors
