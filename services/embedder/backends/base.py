"""The one small interface every embedding backend implements.

Why the split: a model backend's work has a CPU part that parallelises well (decode,
resize, normalise: `preprocess_*`, run in a worker pool, one item at a time) and a part
that must run batched on the device (`forward`, run on one dedicated model thread). The
dynamic batcher sits between the two and merges items from many calls into one forward.
A remote backend (DashScope) instead implements `aforward` as a coroutine: its "model" is
an HTTP API, so several batches are in flight at once and no thread is blocked.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from services.common.deadline import Deadline
from services.common.images import DecodedImage, PixelNeed


class Modality(enum.StrEnum):
    TEXT = "text"
    IMAGE = "image"
    COMPOSED = "composed"


@dataclass(frozen=True)
class BackendInfo:
    backend: str
    model_id: str
    dimension: int
    modalities: tuple[Modality, ...]
    # True: composed items go to the model as one input; False: image and instruction
    # vectors are mixed by `compose`.
    composed_native: bool


class FatalModelError(RuntimeError):
    """The model cannot serve any more (e.g. CUDA out of memory even at batch size 1)."""


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def mix_composed(image_vecs: np.ndarray, text_vecs: np.ndarray, text_weights: np.ndarray) -> np.ndarray:
    """Normalised (1 - w) * image + w * instruction: the composed query of mixing backends."""
    w = np.asarray(text_weights, dtype=np.float32).reshape(-1, 1)
    return l2_normalize((1.0 - w) * l2_normalize(image_vecs) + w * l2_normalize(text_vecs))


class EmbeddingBackend(ABC):
    """What the engine needs from any backend. Subclass `LocalBackend` or `RemoteBackend`."""

    name: ClassVar[str]
    composed_native: ClassVar[bool] = False

    @property
    @abstractmethod
    def info(self) -> BackendInfo:
        """Model id, dimension and modalities; valid once loaded / started."""

    def preprocess_text(self, text: str) -> Any:
        """CPU work for one text (worker pool). Default: the text itself (tokenised in forward)."""
        return text

    @property
    def pixel_need(self) -> PixelNeed | None:
        """How small a decoded image may be for `preprocess_image` (None: full size).

        Decoding shrinks larger images to about twice this before the RGB copy, which
        keeps memory flat under near-limit images (services/common/images.py)."""
        return None

    @abstractmethod
    def preprocess_image(self, image: DecodedImage, data: bytes) -> Any:
        """CPU work for one decoded image (worker pool); `data` is the encoded original."""

    def preprocess_composed(self, image: DecodedImage, data: bytes, instruction: str) -> Any:
        """Only for `composed_native` backends: one model input for image + instruction."""
        raise NotImplementedError(f"{self.name} does not embed composed items natively")

    def compose(self, image_vecs: np.ndarray, text_vecs: np.ndarray, text_weights: np.ndarray) -> np.ndarray:
        """Composed vectors for mixing backends (ignored when `composed_native`)."""
        return mix_composed(image_vecs, text_vecs, text_weights)

    def max_batch_size(self, modality: Modality) -> int | None:
        """The largest batch worth forming for a modality (None: no limit of its own).

        The batcher uses min(this, EMBEDDER_MAX_MODEL_BATCH_SIZE). A CPU convnet, for
        one, gets slower per image once a batch's activations outgrow the caches.
        """
        return None

    async def aclose(self) -> None:
        return None


class LocalBackend(EmbeddingBackend):
    """An in-process model: `load` and `forward` run on the single model thread."""

    # Set by `load` once the weights tell the model id and dimension.
    _info: BackendInfo | None = None

    @property
    def info(self) -> BackendInfo:
        if self._info is None:
            raise RuntimeError("model not loaded")
        return self._info

    @abstractmethod
    def load(self) -> None:
        """Loads weights (blocking). Must be idempotent: a loaded backend may be reused."""

    @abstractmethod
    def forward(self, modality: Modality, batch: list[Any]) -> np.ndarray:
        """Preprocessed items of one modality -> float32 [len(batch), dimension], L2-normalised."""

    def forward_safely(self, modality: Modality, batch: list[Any]) -> np.ndarray:
        """`forward`, but a CUDA out-of-memory is retried in halves before it is fatal.

        A transient OOM (fragmentation, a neighbour's burst) usually clears after
        `empty_cache`; one that persists at batch size 1 means the model cannot serve.
        """
        try:
            return self.forward(modality, batch)
        except Exception as e:
            if not _is_cuda_oom(e):
                if _is_cuda_fault(e):
                    raise FatalModelError(f"CUDA error: {e}") from e
                raise
        _empty_cuda_cache()
        if len(batch) == 1:
            try:
                return self.forward(modality, batch)
            except Exception as e:
                if _is_cuda_oom(e):
                    raise FatalModelError("CUDA out of memory even at batch size 1") from e
                raise
        half = len(batch) // 2
        return np.concatenate(
            [self.forward_safely(modality, batch[:half]), self.forward_safely(modality, batch[half:])]
        )


class RemoteBackend(EmbeddingBackend):
    """A model behind an API: `aforward` is a coroutine, many batches run concurrently."""

    #: Batches in flight at once (the batcher never dispatches more).
    max_in_flight: int = 1

    @abstractmethod
    async def start(self) -> None:
        """Opens clients; raises with a clear message when misconfigured (e.g. no API key)."""

    @abstractmethod
    async def aforward(self, modality: Modality, batch: list[Any], deadline: Deadline) -> np.ndarray:
        """Like `LocalBackend.forward`; `deadline` bounds all attempts and retries."""


def _is_cuda_oom(e: BaseException) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return isinstance(e, torch.cuda.OutOfMemoryError)


def _is_cuda_fault(e: BaseException) -> bool:
    # Device-side asserts and illegal accesses poison the CUDA context for good.
    text = str(e)
    return isinstance(e, RuntimeError) and ("CUDA error" in text or "CUBLAS_STATUS" in text or "cuDNN error" in text)


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
