"""The one small interface every captioning backend implements, and its error type.

A backend turns one prepared image + prompt into text (remote VLMs) or directly into a
description and keywords (the offline lite model). Retries, the concurrency limit,
deadlines, caching and metrics live in the service around it (`upstream.py`,
`service.py`), so a backend is only the protocol of its upstream.
"""

from __future__ import annotations

import base64
import io
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

from PIL import Image

from services.common.errors import DeadlineExceeded, InvalidInput, Overloaded, ServiceError, UpstreamExhausted
from services.common.images import DecodedImage, PixelNeed

#: Image formats every OpenAI-compatible / DashScope VLM endpoint accepts as a data URI.
UPLOAD_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}


@dataclass(frozen=True)
class CaptionJob:
    """One image to caption, already validated and decoded."""

    image: Image.Image  # RGB, EXIF orientation applied
    prompt: str  # final prompt text (language and word limit applied)
    language: str  # "en" or "zh"
    max_words: int
    # The encoded image to send upstream (remote backends only; see `encode_for_upload`).
    upload_bytes: bytes = b""
    upload_mime: str = ""

    @property
    def data_uri(self) -> str:
        return f"data:{self.upload_mime};base64,{base64.b64encode(self.upload_bytes).decode('ascii')}"


@dataclass(frozen=True)
class BackendCaption:
    """What a backend returns. Remote backends fill only `raw_text` (the service parses
    it); structured backends (lite) also give the description and keywords."""

    raw_text: str
    description: str | None = None
    keywords: list[str] | None = None


ErrorKind = Literal["rate_limited", "server", "timeout", "connection", "rejected", "auth", "malformed"]
RETRYABLE: frozenset[str] = frozenset({"rate_limited", "server", "timeout", "connection"})


class UpstreamError(Exception):
    """A failed upstream call, classified so the retry policy and the status code follow.

    `message` is what the upstream said (secrets scrubbed), kept for the caller.
    """

    def __init__(self, kind: ErrorKind, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message
        self.status = status
        self.code = code

    @property
    def retryable(self) -> bool:
        return self.kind in RETRYABLE

    def describe(self) -> str:
        parts = []
        if self.status is not None:
            parts.append(f"HTTP {self.status}")
        if self.code:
            parts.append(str(self.code))
        head = " ".join(parts)
        return f"{head}: {self.message}" if head else self.message

    def to_service_error(self, backend: str, attempts: int) -> ServiceError:
        """The gRPC-facing error once retries are over (the contract in captioner.proto)."""
        what = self.describe()
        tries = f" after {attempts} attempt{'s' if attempts != 1 else ''}"
        if self.kind == "rejected":
            return InvalidInput(f"{backend} rejected the request: {what}")
        if self.kind == "rate_limited":
            return Overloaded(f"{backend} is rate limiting us{tries}: {what}")
        if self.kind == "timeout":
            return DeadlineExceeded(f"{backend} did not answer in time{tries}: {what}")
        # UpstreamExhausted: our retries are spent (or cannot help); callers' gRPC retry
        # policies must not multiply them.
        if self.kind == "auth":
            return UpstreamExhausted(
                f"{backend} refused the server's credentials or model (check configuration): {what}")
        if self.kind == "malformed":
            return UpstreamExhausted(f"{backend} returned a malformed response: {what}")
        return UpstreamExhausted(f"{backend} is unavailable{tries}: {what}")


def kind_for_status(status: int) -> ErrorKind:
    """Default classification of an HTTP status from a model endpoint."""
    if status == 429:
        return "rate_limited"
    if status == 408:
        return "timeout"
    if status in (409, 425) or status >= 500:
        return "server"
    if status in (401, 403, 404):
        return "auth"
    return "rejected"  # 400, 413, 415, 422: this image / prompt is not acceptable


def scrub(message: object, *secrets: str | None) -> str:
    """The upstream's message as text, with any secret replaced and length bounded."""
    text = message if isinstance(message, str) else repr(message)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = " ".join(text.split())
    return text if len(text) <= 500 else text[:500] + "…"


def encode_for_upload(decoded: DecodedImage, data: bytes, max_side: int, max_bytes: int) -> tuple[bytes, str]:
    """The bytes and MIME type to send upstream.

    The caller's bytes when they are already small and in a format every VLM endpoint
    reads; otherwise a JPEG with the long side capped (Qwen-VL downsizes large images
    anyway, so sending 20 MB only costs time and money).
    """
    fmt = decoded.format
    if fmt in UPLOAD_FORMATS and max(decoded.source_size) <= max_side and len(data) <= max_bytes:
        return data, UPLOAD_FORMATS[fmt]
    img = decoded.image  # possibly already shrunk at decode (PixelNeed(long_side=max_side))
    if max(img.size) > max_side:
        img = img.copy()
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    quality = 90
    while True:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        out = buf.getvalue()
        if len(out) <= max_bytes or quality <= 40:
            return out, "image/jpeg"
        quality -= 15


class CaptionBackend(ABC):
    """One upstream. Implementations: lite.py, dashscope.py, openai.py."""

    #: "lite", "dashscope" or "openai" (the `backend` metric label).
    name: str
    #: The model that produces the captions (reported in every Caption).
    model_id: str
    #: Remote backends need the encoded image (`CaptionJob.upload_bytes`) and are retried.
    remote: bool = True
    #: How small the decoded image may be (services/common/images.py); None: full size.
    #: Remote backends get `PixelNeed(long_side=upload_max_side_px)` from the service.
    pixel_need: PixelNeed | None = None

    async def start(self) -> None:
        """Loads models / opens connections; the server is not SERVING before it returns."""

    async def aclose(self) -> None:
        """Releases connections and threads."""

    def ready(self) -> bool:
        return True

    @abstractmethod
    async def caption(self, job: CaptionJob, timeout_s: float) -> BackendCaption:
        """One attempt within `timeout_s`. Raises `UpstreamError` for upstream failures."""
