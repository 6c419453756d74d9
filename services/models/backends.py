"""The two lite backends, sharing one classifier (`SharedClassifier`).

Thin subclasses of services/embedder/backends/lite.py and services/captioner/backends/lite.py:
the embedder's backend loads the models as usual and hands its classifier over; image
items carry the SHA-256 of their bytes, so probabilities the captioner computed (or the
embedder, for a later caption) are reused instead of running the CNN again.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.captioner.backends.base import BackendCaption, CaptionJob
from services.captioner.backends.lite import LiteBackend as LiteCaptionBackend
from services.captioner.service import CaptionService, _Resolved
from services.captioner.settings import CaptionerSettings
from services.common.deadline import Deadline
from services.common.images import DecodedImage, sha256_hex
from services.embedder.backends.base import Modality
from services.embedder.backends.lite import LiteBackend as LiteEmbedderBackend
from services.embedder.engine import EmbeddingEngine
from services.embedder.settings import EmbedderSettings
from services.models.shared import KeyedImage, SharedClassifier


class SharedLiteEmbedder(LiteEmbedderBackend):
    def __init__(self, settings: EmbedderSettings, shared: SharedClassifier) -> None:
        # Built as the embedder builds its lite backend (whatever options it reads).
        self.__dict__.update(LiteEmbedderBackend.from_settings(settings).__dict__)
        self.shared = shared

    def load(self) -> None:
        super().load()
        self.shared.attach(self.conse.classifier)

    def preprocess_image(self, image: DecodedImage, data: bytes) -> KeyedImage:
        return KeyedImage(sha256_hex(data), pixels=super().preprocess_image(image, data))

    def forward(self, modality: Modality, batch: list[Any]) -> np.ndarray:
        if modality is Modality.IMAGE:
            return self._out(self.conse.image_vectors_from_proba(self.shared.probs(batch)))
        return super().forward(modality, batch)


class SharedEmbeddingEngine(EmbeddingEngine):
    """Skips decoding an image whose probabilities are already known (the captioner just
    decoded the same bytes under the same limits and pixel need: same outcome)."""

    def __init__(self, settings: EmbedderSettings, backend: SharedLiteEmbedder, skip_decode: bool) -> None:
        super().__init__(settings, backend)
        self.shared = backend.shared
        self.skip_decode = skip_decode

    def _prepare_image(self, data: bytes) -> Any:
        if self.skip_decode:
            key = sha256_hex(data)
            row = self.shared.lookup(key)
            if row is not None:
                return KeyedImage(key, probs=row)
        return super()._prepare_image(data)


@dataclass(frozen=True)
class KeyedCaptionJob(CaptionJob):
    key: str = ""
    probs: np.ndarray | None = None


class SharedLiteCaptioner(LiteCaptionBackend):
    def __init__(self, settings: CaptionerSettings, shared: SharedClassifier) -> None:
        super().__init__(settings)
        self.shared = shared

    async def start(self) -> None:
        # The embedder loaded (and warmed up) the classifier: nothing to load here.
        if self.shared.classifier is None:
            raise RuntimeError("the shared classifier is not loaded")
        self._classifier = self.shared.classifier
        self.model_id = self._classifier.model_id

    async def caption(self, job: CaptionJob, timeout_s: float) -> BackendCaption:
        classifier = self._classifier
        if classifier is None:
            raise RuntimeError("lite model is not loaded")
        assert isinstance(job, KeyedCaptionJob)
        row = job.probs
        if row is None:
            pixels = await asyncio.to_thread(_pixels, job.image)
            loop = asyncio.get_running_loop()
            probs = await loop.run_in_executor(self.shared.executor, self.shared.probs,
                                               [KeyedImage(job.key, pixels=pixels)])
            row = probs[0]
        return self.caption_from_probs(classifier, row)


def _pixels(image: Any) -> np.ndarray:
    from services.lite_models.imagenet import preprocess_image

    return preprocess_image(image)


class SharedCaptionService(CaptionService):
    """Prepares keyed jobs; skips decoding an image whose probabilities are known."""

    def __init__(self, settings: CaptionerSettings, backend: SharedLiteCaptioner, skip_decode: bool) -> None:
        super().__init__(settings, backend)
        self.shared = backend.shared
        self.skip_decode = skip_decode

    async def _prepare(self, data: bytes, resolved: _Resolved, deadline: Deadline) -> CaptionJob:
        key = sha256_hex(data)
        row = self.shared.lookup(key) if self.skip_decode else None
        if row is not None:
            return KeyedCaptionJob(None, resolved.prompt, resolved.language, resolved.max_words,  # type: ignore[arg-type]
                                   key=key, probs=row)
        job = await super()._prepare(data, resolved, deadline)
        return KeyedCaptionJob(job.image, job.prompt, job.language, job.max_words, key=key)
