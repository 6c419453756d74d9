"""The one small interface every captioning backend implements.

A backend turns one prepared image + prompt into text (remote VLMs) or directly into a
description and keywords (the offline lite model). Retries, the concurrency limit,
deadlines, error classification and secret scrubbing live in the shared upstream kit
(`services/common/upstream.py`), caching and metrics in `service.py`, so a backend is
only the protocol of its upstream: one attempt that raises `UpstreamError`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from PIL import Image

from services.common.images import PixelNeed
from services.common.upstream import data_uri


@dataclass(frozen=True)
class CaptionJob:
    """One image to caption, already validated and decoded."""

    image: Image.Image  # RGB, EXIF orientation applied
    prompt: str  # final prompt text (language and word limit applied)
    language: str  # "en" or "zh"
    max_words: int
    # The encoded image to send upstream (remote backends only; `reencode_for_upload`).
    upload_bytes: bytes = b""
    upload_mime: str = ""

    @property
    def data_uri(self) -> str:
        return data_uri(self.upload_bytes, self.upload_mime)


@dataclass(frozen=True)
class BackendCaption:
    """What a backend returns. Remote backends fill only `raw_text` (the service parses
    it); structured backends (lite) also give the description and keywords."""

    raw_text: str
    description: str | None = None
    keywords: list[str] | None = None


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
        """One attempt within `timeout_s`. Raises `services.common.upstream.UpstreamError`
        for upstream failures."""
