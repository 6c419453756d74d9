"""DashScope `multimodal-embedding-v1` through the official `dashscope` SDK.

Texts go as `{"text": ...}` contents, images as base64 data URIs `{"image": "data:..."}`
(as in the Alibaba Cloud tutorial), so no image ever needs a public URL. Batches from
the dynamic batcher are split to the model's per-call limits (contents per call,
images per call) and the calls run concurrently, bounded per replica.

Each call is retried on 429 and 5xx (and network errors) with exponential backoff and
full jitter within a budget that never outlives the caller's deadline
(services/common/retries.py). The API key comes from settings (a Kubernetes secret) and
is never logged: it is scrubbed from any upstream message we log or return.

SDK detail: the SDK treats any content string that names an existing local file as a
file to upload to DashScope's OSS. A text such as "/etc/passwd" would leak that file, so
the call goes through a subclass that switches that upload step off.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import time
from typing import Any

import aiohttp
import numpy as np
from dashscope.embeddings.multimodal_embedding import AioMultiModalEmbedding
from PIL import Image

from services.common.errors import DeadlineExceeded, InvalidInput, ServiceError, Unavailable, UpstreamExhausted
from services.common.images import DecodedImage, PixelNeed
from services.common.log import get_logger
from services.common.retries import upstream_retrying
from services.embedder.backends.base import BackendInfo, Modality, RemoteBackend, l2_normalize
from services.embedder.metrics import UPSTREAM_REQUESTS
from services.embedder.settings import DashScopeSettings, EmbedderSettings

log = get_logger(__name__)


_MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "BMP": "image/bmp"}


class _NoUploadEmbedding(AioMultiModalEmbedding):
    """The SDK call without its local-file upload step (see the module docstring)."""

    @classmethod
    def _preprocess_message_inputs(cls, model: str, input_data: Any, api_key: str) -> bool:
        return False


class _UpstreamError(Exception):
    def __init__(
        self, outcome: str, message: str, *, status: int | None = None, code: str | None = None, retryable: bool
    ) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.message = message
        self.status = status
        self.code = code
        self.retryable = retryable


def _retryable(e: BaseException) -> bool:
    return isinstance(e, _UpstreamError) and e.retryable


def image_data_uri(image: DecodedImage, data: bytes, max_bytes: int) -> str:
    """A data URI DashScope accepts: the original bytes when possible, else a JPEG under the limit."""
    mime = _MIME.get(image.format)
    if mime is not None and len(data) <= max_bytes:
        payload = data
    else:
        mime = "image/jpeg"
        img: Image.Image = image.image
        quality = 90
        while True:
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=quality)
            payload = buf.getvalue()
            if len(payload) <= max_bytes or max(img.size) <= 64:
                break
            scale = max(0.5, min(0.9, (max_bytes / len(payload)) ** 0.5))
            img = img.resize(
                (max(1, int(img.width * scale)), max(1, int(img.height * scale))), Image.Resampling.LANCZOS
            )
            quality = 85
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


class DashScopeBackend(RemoteBackend):
    name = "dashscope"

    def __init__(self, settings: DashScopeSettings, model_id: str | None = None) -> None:
        self.settings = settings
        self.max_in_flight = settings.max_concurrent_calls
        self._model_id = model_id or f"dashscope:{settings.model}"
        self._calls = asyncio.Semaphore(settings.max_concurrent_calls)
        self._session: aiohttp.ClientSession | None = None
        self._api_key: str | None = None

    @classmethod
    def from_settings(cls, settings: EmbedderSettings) -> DashScopeBackend:
        return cls(settings.dashscope, settings.model_id)

    @property
    def info(self) -> BackendInfo:
        return BackendInfo(self.name, self._model_id, self.settings.dimension, (Modality.TEXT, Modality.IMAGE), False)

    async def start(self) -> None:
        key = self.settings.api_key.get_secret_value() if self.settings.api_key else os.environ.get("DASHSCOPE_API_KEY")
        if not key:
            raise RuntimeError("the dashscope backend needs an API key: set EMBEDDER_DASHSCOPE__API_KEY")
        self._api_key = key
        self._calls = asyncio.Semaphore(self.settings.max_concurrent_calls)  # bound to the serving loop
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
        return image_data_uri(image, data, self.settings.max_image_bytes)

    # --- calls --------------------------------------------------------------------------------

    def _chunks(self, modality: Modality, batch: list[str]) -> list[list[dict[str, str]]]:
        key = "text" if modality is Modality.TEXT else "image"
        per_call = self.settings.max_contents_per_call
        if modality is Modality.IMAGE:
            per_call = min(per_call, self.settings.max_images_per_call)
        contents = [{key: value} for value in batch]
        return [contents[i : i + per_call] for i in range(0, len(contents), per_call)]

    async def aforward(self, modality: Modality, batch: list[Any], deadline: float | None) -> np.ndarray:
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

    def _scrub(self, text: str) -> str:
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return text

    def _before_sleep(self, state: Any) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.warning(
            "dashscope call failed; retrying",
            attempt=state.attempt_number,
            outcome=getattr(error, "outcome", None),
            status=getattr(error, "status", None),
            code=getattr(error, "code", None),
            error=self._scrub(str(error)),
            sleep_s=round(state.next_action.sleep, 3) if state.next_action else None,
        )

    async def _call(self, contents: list[dict[str, str]], deadline: float | None) -> np.ndarray:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded("deadline exceeded before calling DashScope")
        attempts = 0
        try:
            async for attempt in upstream_retrying(
                self.settings.retry, _retryable, deadline_s=remaining, before_sleep=self._before_sleep
            ):
                with attempt:
                    attempts += 1
                    async with self._calls:
                        return await self._call_once(contents, deadline)
        except _UpstreamError as e:
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded(f"deadline exceeded while calling DashScope (last: {e.message})") from None
            raise self._service_error(e, attempts) from None
        raise Unavailable("DashScope call was not attempted")  # pragma: no cover - retrying yields >= 1

    def _service_error(self, e: _UpstreamError, attempts: int) -> ServiceError:
        detail = self._scrub(e.message)
        if e.outcome == "client_error" and e.status in (400, 413):
            return InvalidInput(f"DashScope rejected the input: {detail}")
        # UpstreamExhausted: our retries are spent; callers' gRPC retries must not multiply them.
        if e.outcome == "client_error" and e.status in (401, 403):
            return UpstreamExhausted(f"DashScope refused our credentials: {detail}")
        return UpstreamExhausted(f"DashScope is unavailable after {attempts} attempt(s): {detail}")

    async def _call_once(self, contents: list[dict[str, str]], deadline: float | None) -> np.ndarray:
        timeout = self.settings.request_timeout_s
        if deadline is not None:
            timeout = max(0.001, min(timeout, deadline - time.monotonic()))
        try:
            response = await _NoUploadEmbedding.call(
                model=self.settings.model,
                input=[dict(c) for c in contents],  # the SDK may rewrite items in place
                api_key=self._api_key,
                base_address=self.settings.base_url,
                session=self._session,
                request_timeout=timeout,
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            UPSTREAM_REQUESTS.labels("network_error").inc()
            raise _UpstreamError("network_error", f"{type(e).__name__}: {e}", retryable=True) from None
        status = int(response.status_code)
        if status != 200:
            code = str(response.code or "")
            request_id = getattr(response, "request_id", "") or ""
            message = f"HTTP {status} {code}: {response.message or ''} (request_id={request_id})"
            if status == 429:
                outcome, retryable = "throttled", True
            elif status >= 500:
                outcome, retryable = "server_error", True
            else:
                outcome, retryable = "client_error", False
            UPSTREAM_REQUESTS.labels(outcome).inc()
            raise _UpstreamError(outcome, message, status=status, code=code, retryable=retryable)
        try:
            rows = sorted(response.output["embeddings"], key=lambda r: int(r["index"]))
            vectors = np.asarray([r["embedding"] for r in rows], dtype=np.float32)
            if vectors.shape != (len(contents), self.settings.dimension):
                raise ValueError(f"got {vectors.shape}, expected ({len(contents)}, {self.settings.dimension})")
        except (KeyError, TypeError, ValueError) as e:
            UPSTREAM_REQUESTS.labels("bad_response").inc()
            raise _UpstreamError("bad_response", f"unexpected DashScope response: {e}", retryable=False) from None
        UPSTREAM_REQUESTS.labels("ok").inc()
        return vectors
