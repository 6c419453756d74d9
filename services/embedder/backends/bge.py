"""Visualized BGE (BAAI): native composed image + instruction embeddings.

The model of the Milvus composed-image-retrieval tutorial: a BGE text encoder that also
reads EVA-CLIP image tokens, so an image and an instruction are embedded *together*
(`encode_mm`) instead of mixing two vectors. Texts alone use `encode_text`, images alone
`encode_image` (image + empty prompt), all in one space.

Dependency: the model code is either the `visual_bge` package of the FlagEmbedding
repository (research/visual_bge, newer) or `FlagEmbedding.visual` as shipped on PyPI by
FlagEmbedding <= 1.2.11 (what the Milvus tutorial imports; 1.3+ dropped it). Both need
torchvision and timm (plus einops, ftfy): install them in the GPU image, where a CUDA
torchvision matches the CUDA torch. Weights: the BGE text model directory
(EMBEDDER_MODEL_DIR) plus the Visualized BGE weight file (EMBEDDER_BGE__WEIGHTS_FILE).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.common.images import DecodedImage, PixelNeed
from services.embedder.backends.base import BackendInfo, LocalBackend, Modality, l2_normalize
from services.embedder.backends.torch_device import resolve_device, resolve_dtype, set_threads
from services.embedder.settings import EmbedderSettings

MISSING_PACKAGE = (
    "the bge backend needs Visualized BGE's model code: the `visual_bge` package (FlagEmbedding"
    " repository, research/visual_bge) or `FlagEmbedding.visual` (pip install 'FlagEmbedding<=1.2.11'),"
    " with torchvision, timm, einops and ftfy"
)


def _visualized_bge_class() -> Any:
    """The model class from whichever of its two distributions is installed."""
    errors = []
    for module in ("visual_bge.modeling", "FlagEmbedding.visual.modeling"):
        try:
            return importlib.import_module(module).Visualized_BGE
        except Exception as e:  # noqa: BLE001 - ImportError, or torchvision failing to load its ops
            errors.append(f"{module}: {type(e).__name__}: {e}")
    raise RuntimeError(f"{MISSING_PACKAGE} ({'; '.join(errors)})")


class VisualizedBgeBackend(LocalBackend):
    name = "bge"
    composed_native = True

    def __init__(
        self,
        text_model_dir: str | Path,
        weights_file: str | Path,
        model_name: str = "bge-base-en-v1.5",
        device: str = "auto",
        dtype: str = "auto",
        model_id: str | None = None,
        torch_threads: int | None = None,
    ) -> None:
        self.text_model_dir = Path(text_model_dir)
        self.weights_file = Path(weights_file)
        self.model_name = model_name
        self._device_setting = device
        self._dtype_setting = dtype
        self._model_id = model_id
        self._torch_threads = torch_threads
        self.model: Any = None

    @classmethod
    def from_settings(cls, settings: EmbedderSettings) -> VisualizedBgeBackend:
        if settings.model_dir is None or settings.bge.weights_file is None:
            raise ValueError(
                "the bge backend needs EMBEDDER_MODEL_DIR (the BGE text model directory)"
                " and EMBEDDER_BGE__WEIGHTS_FILE (the Visualized BGE .pth file)"
            )
        return cls(
            settings.model_dir,
            settings.bge.weights_file,
            settings.bge.model_name,
            settings.device,
            settings.dtype,
            settings.model_id,
            settings.torch_threads,
        )

    def load(self) -> None:
        if self.model is not None:
            return
        visualized_bge = _visualized_bge_class()
        for path in (self.text_model_dir / "config.json", self.weights_file):
            if not path.is_file():
                raise FileNotFoundError(f"Visualized BGE file not found: {path}")
        set_threads(self._torch_threads)
        self.device = resolve_device(self._device_setting)
        self.dtype = resolve_dtype(self._dtype_setting, self.device)
        # `model_name_bge` only selects the architecture (vision tower, width); config,
        # tokenizer and weights all come from local files.
        model = visualized_bge(
            model_name_bge=f"BAAI/{self.model_name}",
            model_weight=str(self.weights_file),
            from_pretrained=str(self.text_model_dir),
        )
        model = model.to(self.device, dtype=self.dtype).eval()
        model.device = self.device
        model.dtype = self.dtype  # it builds attention masks in this dtype
        self.model = model
        model_id = self._model_id or f"visualized-bge:{self.model_name}"
        modalities = (Modality.TEXT, Modality.IMAGE, Modality.COMPOSED)
        self._info = BackendInfo(self.name, model_id, int(model.hidden_dim), modalities, True)

    @property
    def pixel_need(self) -> PixelNeed:
        return PixelNeed(short_side=224)  # Visualized BGE's EVA-CLIP tower: 224 px input

    def preprocess_image(self, image: DecodedImage, data: bytes) -> torch.Tensor:
        return self.model.preprocess_val(image.image)

    def preprocess_composed(self, image: DecodedImage, data: bytes, instruction: str) -> tuple[torch.Tensor, str]:
        return self.model.preprocess_val(image.image), instruction

    def _tokens(self, texts: list[str]) -> Any:
        tokens = self.model.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=512)
        return tokens.to(self.device)

    def forward(self, modality: Modality, batch: list[Any]) -> np.ndarray:
        model = self.model
        with torch.inference_mode():
            if modality is Modality.TEXT:
                vectors = model.encode_text(self._tokens(list(batch)))
            elif modality is Modality.IMAGE:
                images = torch.stack(batch).to(self.device, dtype=self.dtype)
                vectors = model.encode_image(images)
            else:
                images = torch.stack([b[0] for b in batch]).to(self.device, dtype=self.dtype)
                vectors = model.encode_mm(images, self._tokens([b[1] for b in batch]))
        return l2_normalize(vectors.float().cpu().numpy())
